"""Bad input across the public API, one table: every entry must raise the stated error type with a message that
names the argument and what was expected, and must not crash the process. The per-op test files check their own
ops' inputs in more detail; this table is the API-wide inventory (issue 9)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import electra_ext
from electra_ext import ops
from electra_ext.data.sources import iter_documents
from electra_ext.data.tokenizer import load_tokenizer, train_tokenizer
from electra_ext.modules import ElectraConfig, ElectraDiscriminator, ElectraPretrainingConfig
from electra_ext.train.config import TrainConfig

TINY = dict(vocab_size=120, embedding_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=24)


def disc_inputs(n=5, h=8):
    return [torch.randn(n, h), torch.randn(h), torch.randn(1), torch.zeros(n, dtype=torch.bool),
            torch.ones(n, dtype=torch.bool)]


def with_item(values, index, value):
    values = list(values)
    values[index] = value
    return values


def qkv(batch=2, seq=6, heads=2, dim=8, dtype=torch.float32):
    return [torch.randn(batch, seq, heads, dim, dtype=dtype) for _ in range(3)]


def gen_inputs(rows=4, vocab=30, hidden=8):
    return [torch.randn(rows, hidden), torch.randn(vocab, hidden), torch.randn(vocab),
            torch.randint(0, vocab, (rows,))]


def discriminator():
    return ElectraDiscriminator(ElectraConfig(**TINY)).eval()


def hf_config():
    import transformers
    return transformers.ElectraConfig(**TINY)


def ids(batch=2, seq=8, high=TINY["vocab_size"]):
    return torch.randint(1, high, (batch, seq))


def ids_with(position, value):
    values = ids()
    values[1, position] = value
    return values


def write(path, content, mode="w"):
    with open(path, mode) as file:
        file.write(content)
    return str(path)


def hf_directory_without_a_key(tmp_path):
    model = discriminator()
    model.save_pretrained(tmp_path / "model")
    state = {k: v for k, v in model.state_dict().items() if "encoder.layer.0.output.dense.weight" not in k}
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model" / "model.safetensors"))
    return tmp_path / "model"


# (id, call(tmp_path), error type, message pattern naming the argument and what was expected)
BAD_INPUTS = [
    # disc_head
    ("disc_head x integer", lambda p: ops.disc_head(*with_item(disc_inputs(), 0, torch.ones(5, 8, dtype=torch.long))),
     (TypeError, ValueError), r"x"),
    ("disc_head w wrong length", lambda p: ops.disc_head(*with_item(disc_inputs(), 1, torch.randn(9))),
     ValueError, r"w"),
    ("disc_head b not [1]", lambda p: ops.disc_head(*with_item(disc_inputs(), 2, torch.randn(2))), ValueError, r"b"),
    ("disc_head labels wrong shape",
     lambda p: ops.disc_head(*with_item(disc_inputs(), 3, torch.zeros(4, dtype=torch.bool))), ValueError, r"labels"),
    ("disc_head valid not bool", lambda p: ops.disc_head(*with_item(disc_inputs(), 4, torch.ones(5))),
     (TypeError, ValueError), r"valid"),
    ("disc_head x on meta device", lambda p: ops.disc_head(*with_item(disc_inputs(), 0, torch.randn(5, 8, device="meta"))),
     ValueError, r"device"),
    ("disc_head unknown backend", lambda p: ops.disc_head(*disc_inputs(), backend="fast"), ValueError, r"backend"),
    # attention
    ("attention q not 4-D", lambda p: ops.attention(torch.randn(6, 2, 8), *qkv()[1:]), ValueError, r"q must be"),
    ("attention k shape differs", lambda p: ops.attention(qkv()[0], torch.randn(2, 5, 2, 8), qkv()[2]), ValueError,
     r"k and v must have q's shape"),
    ("attention mixed dtypes", lambda p: ops.attention(qkv()[0], *qkv(dtype=torch.bfloat16)[1:]), TypeError,
     r"q, k, v must share one floating dtype"),
    ("attention integer q", lambda p: ops.attention(*[t.long() for t in qkv()]), TypeError, r"floating dtype"),
    ("attention seqlens above T", lambda p: ops.attention(*qkv(), seqlens=torch.tensor([6, 7], dtype=torch.int32)),
     ValueError, r"seqlens"),
    ("attention negative seqlens",
     lambda p: ops.attention(*qkv(), seqlens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, r"seqlens"),
    ("attention seqlens wrong length",
     lambda p: ops.attention(*qkv(), seqlens=torch.tensor([3], dtype=torch.int32)), ValueError, r"seqlens"),
    ("attention dropout 1", lambda p: ops.attention(*qkv(), dropout_p=1.0), ValueError, r"dropout_p must be in"),
    ("attention dropout NaN", lambda p: ops.attention(*qkv(), dropout_p=float("nan")), ValueError, r"dropout_p"),
    ("attention softmax_scale inf", lambda p: ops.attention(*qkv(), softmax_scale=float("inf")), ValueError,
     r"softmax_scale must be a positive number"),
    ("attention emulated float32", lambda p: ops.attention(*qkv(dim=32), backend="emulated"), ValueError,
     r"backend='emulated'.*float16/bfloat16"),
    ("attention_varlen cu_seqlens decreasing",
     lambda p: ops.attention_varlen(*[torch.randn(6, 2, 8) for _ in range(3)],
                                    torch.tensor([0, 4, 2], dtype=torch.int32), 4), ValueError, r"cu_seqlens"),
    ("attention_varlen max_seqlen too small",
     lambda p: ops.attention_varlen(*[torch.randn(6, 2, 8) for _ in range(3)],
                                    torch.tensor([0, 4, 6], dtype=torch.int32), 3), ValueError,
     r"sequence lengths \(differences of cu_seqlens\) must lie in \[0, 3\]"),
    # gen_head
    ("gen_head E mismatch", lambda p: ops.gen_head(*with_item(gen_inputs(), 1, torch.randn(30, 9))), ValueError,
     r"h must be \[M, E\] and weight \[V, E\]"),
    ("gen_head target beyond V", lambda p: ops.gen_head(*with_item(gen_inputs(), 3, torch.tensor([0, 30, 1, 2]))),
     ValueError, r"targets must lie in \[0, V = 30\)"),
    ("gen_head negative target", lambda p: ops.gen_head(*with_item(gen_inputs(), 3, torch.tensor([0, -3, 1, 2]))),
     ValueError, r"targets must lie in"),
    ("gen_head int32 targets", lambda p: ops.gen_head(*with_item(gen_inputs(), 3, torch.zeros(4, dtype=torch.int32))),
     ValueError, r"targets must be int64"),
    ("gen_head temperature 0", lambda p: ops.gen_head(*gen_inputs(), temperature=0.0), ValueError,
     r"temperature must be a positive number"),
    ("gen_head temperature NaN", lambda p: ops.gen_head(*gen_inputs(), temperature=float("nan")), ValueError,
     r"temperature"),
    ("gen_head bias wrong length", lambda p: ops.gen_head(*with_item(gen_inputs(), 2, torch.randn(29))), ValueError,
     r"bias must be \[V=30\]"),
    ("gen_head emulated float32", lambda p: ops.gen_head(*gen_inputs(), backend="emulated"), ValueError,
     r"backend='emulated'.*float16/bfloat16"),
    # model configuration
    ("config hidden not divisible by heads", lambda p: ElectraConfig(**dict(TINY, num_attention_heads=3)), ValueError,
     r"hidden_size.*num_attention_heads"),
    ("config zero layers", lambda p: ElectraConfig(**dict(TINY, num_hidden_layers=0)), ValueError,
     r"num_hidden_layers must be a positive integer"),
    ("config dropout 1", lambda p: ElectraConfig(**dict(TINY, hidden_dropout_prob=1.0)), ValueError,
     r"hidden_dropout_prob must be in \[0, 1\)"),
    ("config activation", lambda p: ElectraConfig(**dict(TINY, hidden_act="relu")), ValueError, r"hidden_act"),
    ("generator fraction 0", lambda p: ElectraConfig(**TINY).generator(0.0), ValueError,
     r"generator fraction must be in \(0, 1\]"),
    ("unknown preset", lambda p: electra_ext.preset("huge"), ValueError, r"preset must be one of"),
    ("pretraining mask_prob 1", lambda p: ElectraPretrainingConfig.from_preset("tiny", mask_prob=1.0), ValueError,
     r"mask_prob must be in"),
    # model inputs
    ("input_ids float", lambda p: discriminator()(torch.rand(2, 8)), ValueError, r"input_ids must be an integer"),
    ("input_ids beyond vocabulary", lambda p: discriminator()(ids_with(3, TINY["vocab_size"])), ValueError,
     r"input_ids must lie in \[0, vocab_size=120\), got values from \d+ to 120"),
    ("input_ids negative", lambda p: discriminator()(ids_with(5, -1)), ValueError, r"input_ids must lie in"),
    ("input_ids longer than positions", lambda p: discriminator()(ids(seq=30)), ValueError,
     r"max_position_embeddings=24"),
    ("input_ids empty sequence", lambda p: discriminator()(ids(seq=0)), ValueError, r"sequence length must be in"),
    ("attention_mask wrong shape", lambda p: discriminator()(ids(), attention_mask=torch.ones(2, 7)), ValueError,
     r"attention_mask must have input_ids' shape"),
    ("attention_mask left padding",
     lambda p: discriminator()(ids(), attention_mask=torch.tensor([[0] + [1] * 7, [1] * 8])), ValueError,
     r"attention_mask must be 1 on a prefix"),
    ("labels soft", lambda p: discriminator()(ids(), labels=torch.full((2, 8), 0.3)), ValueError,
     r"labels must be 0 \(original\) or 1 \(replaced\)"),
    ("model from a transformers config", lambda p: ElectraDiscriminator(hf_config()), TypeError,
     r"config must be an electra_ext.ElectraConfig, got transformers\..*ElectraConfig\.from_dict"),
    ("token_type_ids beyond type_vocab_size",
     lambda p: discriminator()(ids(), token_type_ids=torch.full((2, 8), 2)), ValueError,
     r"token_type_ids must lie in \[0, type_vocab_size=2\)"),
    # files
    ("config file missing", lambda p: ElectraConfig.load(str(p / "nothing.json")), FileNotFoundError,
     r"no config file at"),
    ("config file not JSON", lambda p: ElectraConfig.load(write(p / "config.json", "{not json")), ValueError,
     r"is not valid JSON"),
    ("config file of another model",
     lambda p: ElectraConfig.load(write(p / "config.json", json.dumps({"model_type": "bert"}))), ValueError,
     r"model_type must be 'electra'"),
    ("config relative positions",
     lambda p: ElectraConfig.from_dict({**TINY, "position_embedding_type": "relative_key"}), ValueError,
     r"position_embedding_type must be 'absolute'.*got 'relative_key'"),
    ("config of a decoder", lambda p: ElectraConfig.from_dict({**TINY, "is_decoder": True}), ValueError,
     r"is_decoder must be False"),
    ("HF directory missing", lambda p: ElectraDiscriminator.from_pretrained(str(p / "absent")), FileNotFoundError,
     r"absent"),
    ("HF directory missing a key", lambda p: ElectraDiscriminator.from_pretrained(str(hf_directory_without_a_key(p))),
     ValueError, r"missing keys.*encoder\.layer\.0\.output\.dense\.weight"),
    ("tokenizer path missing", lambda p: load_tokenizer(str(p / "vocab.txt")), FileNotFoundError, r"does not exist"),
    ("tokenizer file not a tokenizer", lambda p: load_tokenizer(write(p / "tokenizer.json", "[1, 2")), ValueError,
     r"is not a tokenizers JSON file"),
    ("tokenizer vocabulary without specials", lambda p: load_tokenizer(write(p / "vocab.txt", "a\nb\nc\n")),
     ValueError, r"is not a BERT WordPiece vocabulary: sep_token not found"),
    ("train_tokenizer tiny vocabulary", lambda p: train_tokenizer([write(p / "a.txt", "x y z\n")], str(p / "tok"),
                                                                  vocab_size=3), ValueError, r"vocab_size must be"),
    ("corpus source missing", lambda p: list(iter_documents(str(p / "corpus.txt"))), FileNotFoundError,
     r"does not exist"),
    ("JSONL line not an object", lambda p: list(iter_documents(write(p / "c.jsonl", '{"text": "a"}\n[1]\n'))),
     ValueError, r"expected an object with text_field"),
    ("tokenizer on an empty corpus", lambda p: train_tokenizer([write(p / "empty.txt", "")], p / "tok"), ValueError,
     r"hold no text to train a vocabulary on"),
    # training options
    ("train learning rate 0", lambda p: TrainConfig(learning_rate=0.0), ValueError, r"learning_rate must be positive"),
    ("train unknown precision", lambda p: TrainConfig(precision="fp8"), ValueError, r"precision must be one of"),
    ("train sequences longer than positions", lambda p: TrainConfig(max_seq_length=10_000, device="cpu").resolve(),
     ValueError, r"max_seq_length \(10000\) exceeds the model's max_position_embeddings"),
    ("train batch not a multiple of micro batch",
     lambda p: TrainConfig(batch_size=10, micro_batch_size=4, device="cpu").resolve(), ValueError,
     r"batch_size \(10\) must be a multiple of micro_batch_size"),
    ("train unknown device", lambda p: TrainConfig(device="tpu"), ValueError,
     r"device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("train device index not a number", lambda p: TrainConfig(device="cuda:x"), ValueError,
     r"device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ("train mask prob 0", lambda p: TrainConfig(mask_prob=0.0), ValueError, r"mask_prob must be in \(0, 0.99\)"),
    ("train sequence length under the shortest example", lambda p: TrainConfig(max_seq_length=1), ValueError,
     r"max_seq_length must be at least 5"),
    ("train adam epsilon negative", lambda p: TrainConfig(adam_epsilon=-1.0), ValueError,
     r"adam_epsilon must be positive"),
    ("train weight decay negative", lambda p: TrainConfig(weight_decay=-1.0), ValueError,
     r"weight_decay must be non-negative"),
    ("train resume without a run directory", lambda p: TrainConfig(resume=True), ValueError,
     r"resume needs output_dir"),
    # a config file's values: YAML reads 1e-3 as a string
    ("train YAML learning rate read as text",
     lambda p: TrainConfig.from_file(write(p / "c.yaml", "learning_rate: 1e-3\n")), ValueError,
     r"learning_rate must be a number, got '1e-3'"),
    ("train file betas not a list", lambda p: TrainConfig.from_file(write(p / "c.json", '{"adam_betas": 0.9}')),
     ValueError, r"adam_betas must be a list of numbers, got 0.9"),
    ("train file flag as text", lambda p: TrainConfig.from_file(write(p / "c.json", '{"quiet": "false"}')),
     ValueError, r"quiet must be true or false, got 'false'"),
    ("train malformed YAML", lambda p: TrainConfig.from_file(write(p / "c.yml", "steps: [1\n")), ValueError,
     r"c.yml' is not valid YAML"),
    ("train malformed JSON", lambda p: TrainConfig.from_file(write(p / "c.json", '{"steps": ')), ValueError,
     r"c.json' is not valid JSON"),
]


def test_the_table_covers_at_least_40_distinct_inputs():
    assert len({name for name, *_ in BAD_INPUTS}) == len(BAD_INPUTS) >= 40


@pytest.mark.parametrize("name,call,error,message", BAD_INPUTS, ids=[entry[0] for entry in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(tmp_path, name, call, error, message):
    with pytest.raises(error, match=message):
        call(tmp_path)


@pytest.mark.parametrize("variable,value", [("ELECTRA_EXT_BACKEND", "gpu"), ("ELECTRA_EXT_EMULATED_SM", "sm_80"),
                                            ("ELECTRA_EXT_WGMMA", "off")])
def test_bad_environment_names_the_variable(variable, value, tmp_path):
    """The environment variables are read at import: a bad value fails the import with ValueError naming it. The
    child imports the electra_ext this process runs (not a source tree without a compiled _C in its folder)."""
    package_parent = os.path.dirname(os.path.dirname(electra_ext.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_parent, os.environ.get("PYTHONPATH", "")]))
    env[variable] = value
    result = subprocess.run([sys.executable, "-c", "import electra_ext.ops"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ValueError" in result.stderr and variable in result.stderr and repr(value) in result.stderr


def test_bad_cuda_arch_list_names_the_variable():
    """setup.py refuses a TORCH_CUDA_ARCH_LIST naming both 9.0 and 9.0a (the launchers must know which of the two
    a 9.0 device loads), before it writes or compiles anything."""
    if not electra_ext.BUILD_INFO.WITH_CUDA:
        pytest.skip("this build has no CUDA kernels (no CUDA torch or no nvcc): setup.py never reads the list")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {name: value for name, value in os.environ.items() if name != "ELECTRA_EXT_CUDA"}
    env["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0;9.0a"
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "ValueError" in result.stderr and "TORCH_CUDA_ARCH_LIST" in result.stderr and "9.0a" in result.stderr

