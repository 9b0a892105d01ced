#!/usr/bin/env python3
"""Regenerate the bundled public-domain English corpus from Debian bookworm packages.

Writes, under ``electra_ext/data/assets/corpus/``:

* ``world_english_bible.txt.xz`` -- the World English Bible (with Deuterocanon), from the
  SWORD module in the Debian package ``sword-text-web``. One document per chapter (book +
  chapter), one verse per line, verse references, footnotes, cross references, Strong's
  numbers, section headings and all other OSIS markup removed.
* ``jane_austen.txt.xz`` -- Jane Austen's six completed novels, from the R data in the Debian
  package ``r-cran-janeaustenr``. One document per chapter, one paragraph per line (wrapped
  prose lines are joined; indented verse/letter blocks keep their lines); chapter, volume and
  end headings, front matter and the modern editorial note are dropped.
* ``MANIFEST.json`` -- provenance, counts and SHA-256 of each compressed file.

Text format (what ``electra_ext``'s corpus reader expects): UTF-8, one sentence/line per line,
a single blank line between documents, no empty documents, whitespace normalised (NFC, single
spaces, no leading/trailing spaces). Compression is xz (preset 9 | extreme, CRC64 check) via
Python's ``lzma`` with no timestamps, so rerunning gives byte-identical files as long as the
package versions (and the libsword/R that read them) are the same.

How it works: ``apt-get download`` fetches the two .deb files into a temporary directory, their
versions are checked against the ones recorded below (the script refuses to continue if they
differ, unless ``--allow-other-versions``), ``dpkg-deb -x`` unpacks them, and the helper tools
``python3-sword`` (libsword's Python bindings, run with the system ``/usr/bin/python3``) and
``r-base-core`` (``Rscript``) are installed with ``apt-get install`` if missing. Needs a Debian
bookworm machine with apt; installing the tools needs root.

Usage::

    python scripts/regenerate_corpus.py [--out DIR] [--allow-other-versions] [--keep-temp]
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "electra_ext" / "data" / "assets" / "corpus"

# Package versions the shipped files were generated from.
PACKAGES = {
    "sword-text-web": "426.0-1",
    "r-cran-janeaustenr": "1.0.0-1",
}
# Debian packages providing the tools used for extraction (installed if missing).
TOOL_PACKAGES = ["python3-sword", "r-base-core"]
SYSTEM_PYTHON = "/usr/bin/python3"

SWORD_MODULE = "engWEB2015eb"
SWORD_VERSIFICATION = "NRSVA"

XZ_FILTER_PRESET = 9 | lzma.PRESET_EXTREME

# Publication order; keys are the object names in janeaustenr's data.
AUSTEN_NOVELS = [
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
]


class CorpusError(RuntimeError):
    pass


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    try:
        return subprocess.run(cmd, **kw)
    except FileNotFoundError as e:
        raise CorpusError(f"command not found: {cmd[0]} ({e})") from None
    except subprocess.CalledProcessError as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise CorpusError(f"command failed ({e.returncode}): {' '.join(cmd)}\n{err}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Packages and tools
# --------------------------------------------------------------------------------------------


def download_packages(tmp: Path, allow_other_versions: bool) -> dict[str, dict]:
    """apt-get download each source package, check its version, unpack it."""
    debdir = tmp / "debs"
    debdir.mkdir()
    info = {}
    for pkg, expected in PACKAGES.items():
        run(["apt-get", "download", pkg], cwd=debdir, capture_output=True)
        debs = sorted(debdir.glob(f"{pkg}_*.deb"))
        if len(debs) != 1:
            raise CorpusError(f"expected one .deb for {pkg} in {debdir}, found {debs}")
        deb = debs[0]
        version = run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True).stdout.strip()
        if version != expected:
            msg = (
                f"{pkg}: apt offers version {version!r}, but the corpus was generated from {expected!r}. "
                "The output would differ from the recorded files; rerun with --allow-other-versions "
                "to regenerate from this version anyway (and update PACKAGES in this script)."
            )
            if not allow_other_versions:
                raise CorpusError(msg)
            print(f"WARNING: {msg}", file=sys.stderr)
        root = tmp / "root" / pkg
        root.mkdir(parents=True)
        run(["dpkg-deb", "-x", str(deb), str(root)])
        info[pkg] = {"version": version, "root": root, "deb_sha256": sha256_file(deb), "deb": deb.name}
        print(f"downloaded {deb.name} (version {version})")
    return info


def _sword_importable() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    return subprocess.run([SYSTEM_PYTHON, "-c", "import Sword"], capture_output=True).returncode == 0


def ensure_tools() -> None:
    missing = []
    if not _sword_importable():
        missing.append("python3-sword")
    if shutil.which("Rscript") is None:
        missing.append("r-base-core")
    if not missing:
        return
    if os.geteuid() != 0:
        raise CorpusError(
            f"missing tools from Debian packages {missing}; run as root so they can be installed "
            f"(apt-get install -y --no-install-recommends {' '.join(missing)})"
        )
    print(f"installing {missing} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env, capture_output=True)
    if "python3-sword" in missing and not _sword_importable():
        raise CorpusError(f"python3-sword installed but 'import Sword' fails with {SYSTEM_PYTHON}")
    if shutil.which("Rscript") is None:
        raise CorpusError("r-base-core installed but Rscript not found")


def tool_versions() -> dict[str, str]:
    out = {}
    for pkg in ["python3-sword", "libsword1.9.0", "r-base-core"]:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            out[pkg] = r.stdout.strip()
    return out


# --------------------------------------------------------------------------------------------
# World English Bible (SWORD zText module, OSIS markup)
# --------------------------------------------------------------------------------------------

# Runs under the system python3 (python3-sword is built for it). Prints one JSON object per
# verse slot: [osis_book, chapter, verse, linked_to_previous, raw_osis].
SWORD_HELPER = r"""
import json, sys
import Sword

def err(x):
    return ord(x) if isinstance(x, str) else int(x)

path, modname, v11n = sys.argv[1:4]
mgr = Sword.SWMgr(path)
mod = mgr.getModule(modname)
if mod is None:
    sys.exit("SWORD module %s not found under %s" % (modname, path))
vk = Sword.VerseKey()
vk.setVersificationSystem(v11n)
vk.setIntros(True)
vk.setText("Gen 0:0")
err(vk.popError())
prev = None
out = sys.stdout
while True:
    mod.setKey(vk)
    raw = mod.getRawEntry()
    linked = False
    if prev is not None and raw:
        linked = bool(mod.isLinked(prev, vk))
    out.write(json.dumps([vk.getOSISBookName(), vk.getChapter(), vk.getVerse(), linked, raw],
                         ensure_ascii=False) + "\n")
    prev = Sword.VerseKey(vk)
    vk.increment()
    if err(vk.popError()):
        break
"""

_BOOK_END = re.compile(r'<div\b[^>]*\beID="[^"]*"[^>]*\btype="book"[^>]*/>|<div\b[^>]*\btype="book"[^>]*\beID="[^"]*"[^>]*/>')
_NOTE = re.compile(r"<note\b[^>]*/>|<note\b[^>]*>.*?</note>", re.S)
_TITLE = re.compile(r"<title\b([^>]*)>(.*?)</title>", re.S)
_Q_TAG = re.compile(r"</?q\b[^>]*>")
_SPEAKER = re.compile(r"<speaker\b[^>]*>.*?</speaker>", re.S)
# Elements that separate words (poetry lines, paragraphs, list items, milestones).
_BLOCK_TAG = re.compile(r"</?(?:l|lg|lb|div|p|milestone|chapter|item|list|verse|table|row|cell)\b[^>]*>")
_ANY_TAG = re.compile(r"<[^>]*>")
_WS = re.compile(r"\s+")
_NOTE_MARK = "\x00"
_OPENERS = "“‘([{"


def _resolve_note_marks(text: str) -> str:
    """Removing a footnote can glue two words ("God<note/>created"): put a space back where needed.

    A mark becomes a space if the text before it does not end in whitespace, an opening quote or bracket
    or a dash, and the text after it starts with a letter, digit or opening quote/bracket.
    """
    out = []
    n = len(text)
    for i, ch in enumerate(text):
        if ch != _NOTE_MARK:
            out.append(ch)
            continue
        prev = next((c for c in reversed(out) if c != _NOTE_MARK), "")
        j = i + 1
        while j < n and text[j] == _NOTE_MARK:
            j += 1
        nxt = text[j] if j < n else ""
        if prev and not prev.isspace() and prev not in _OPENERS + "—–-" and (nxt.isalnum() or (nxt and nxt in _OPENERS)):
            if not (out and out[-1] == " "):
                out.append(" ")
    return "".join(out)


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\u00ad", "").replace("\u200b", "").replace("\ufeff", "")
    return _WS.sub(" ", text).strip()


def osis_to_text(raw: str) -> tuple[list[str], str]:
    """Return (canonical psalm titles, verse text) for one raw OSIS verse entry."""
    m = _BOOK_END.search(raw)
    if m:  # anything after the end of the book (e.g. the glossary after Rev 22:21) is back matter
        raw = raw[: m.start()]
    raw = _NOTE.sub(_NOTE_MARK, raw)
    # The source often omits the space after a quotation (".”</q>Immediately"): treat quotation
    # boundaries like removed notes, i.e. as a word break where one is needed.
    raw = _Q_TAG.sub(_NOTE_MARK, raw)
    titles = []
    for tm in _TITLE.finditer(raw):
        attrs, content = tm.group(1), tm.group(2)
        if 'canonical="true"' in attrs:
            t = normalise(_resolve_note_marks(html.unescape(_ANY_TAG.sub(" ", content))))
            # keep superscriptions ("A Psalm by David."), drop acrostic letter labels ("ALEPH")
            if any(c.islower() for c in t):
                titles.append(t)
    raw = _TITLE.sub(" ", raw)
    raw = _SPEAKER.sub(" ", raw)
    raw = _BLOCK_TAG.sub(" ", raw)
    raw = _ANY_TAG.sub("", raw)
    raw = html.unescape(raw)
    raw = _resolve_note_marks(raw)
    return titles, normalise(raw)


def extract_bible(sword_root: Path, tmp: Path) -> tuple[list[list[str]], dict]:
    helper = tmp / "sword_dump.py"
    helper.write_text(SWORD_HELPER)
    env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8", HOME=str(tmp))
    env.pop("SWORD_PATH", None)
    proc = run(
        [SYSTEM_PYTHON, str(helper), str(sword_root) + "/", SWORD_MODULE, SWORD_VERSIFICATION],
        capture_output=True,
        env=env,
    )
    docs: list[list[str]] = []
    current_key = None
    current: list[str] = []
    stats = {"verse_slots": 0, "empty_slots": 0, "linked_skipped": 0, "books": []}
    for line in proc.stdout.decode("utf-8").splitlines():
        book, chapter, verse, linked, raw = json.loads(line)
        stats["verse_slots"] += 1
        if chapter == 0:  # book introductions / front matter (preface), not scripture
            continue
        if linked:
            stats["linked_skipped"] += 1
            continue
        key = (book, chapter)
        if key != current_key:
            if current:
                docs.append(current)
            current_key, current = key, []
            if not stats["books"] or stats["books"][-1] != book:
                stats["books"].append(book)
        titles, text = osis_to_text(raw)
        current.extend(titles)
        if text:
            current.append(text)
        elif verse > 0 and not titles:
            stats["empty_slots"] += 1
    if current:
        docs.append(current)
    if not docs:
        raise CorpusError("no text extracted from the SWORD module")
    return docs, stats


# --------------------------------------------------------------------------------------------
# Jane Austen (janeaustenr lazy-load R data)
# --------------------------------------------------------------------------------------------

R_DUMP = r"""
args <- commandArgs(trailingOnly = TRUE)
e <- new.env()
lazyLoad(file.path(args[1], "data", "Rdata"), envir = e)
for (n in ls(e)) {
  x <- get(n, envir = e)
  if (!is.character(x)) next
  con <- file(file.path(args[2], paste0(n, ".txt")), "wb")
  writeLines(x, con, useBytes = TRUE)
  close(con)
}
"""

_CHAPTER = re.compile(r"^\s*chapter\s+(?:\d+|[ivxlc]+)\.?\s*$", re.I)
_SKIP_LINE = re.compile(r"^\s*(?:volume\s+[ivx\d]+|the end|finis)\.?\s*$", re.I)
_STARS = re.compile(r"^[\s*]+$")
# bracketed editors' notes, e.g. "[At this point in the first and second editions, Volume II ended.]"
_EDITORIAL = re.compile(r"^\[[^\]]*\beditions?\b[^\]]*\]$", re.I)
_ITALIC = re.compile(r"(?<![\w_])_([^_\n]+?)_(?![\w_])")
_FOOTNOTE_MARK = re.compile(r"(?<=[\w,.;:!?])\*(?=\s|$)")


def _austen_paragraphs(block: list[str]) -> list[str]:
    lines = [l for l in block if l.strip()]
    if not lines:
        return []
    def starts_upper(s: str) -> bool:
        s = s.strip().lstrip("\"'(")
        return bool(s) and not s[0].islower()

    # An indented block whose lines all start with a capital is verse (e.g. the charade in Emma):
    # keep its lines. Indented letters are wrapped prose like the rest: join them.
    if all(l[:1].isspace() for l in lines) and all(starts_upper(l) for l in lines[1:]):
        pieces = lines
    else:
        pieces = [" ".join(l.strip() for l in lines)]
    out = []
    for p in pieces:
        p = normalise(p)
        if not p or _STARS.match(p) or _EDITORIAL.match(p):
            continue
        if p.startswith("*") and len(p) > 1 and p[1].isalpha():  # a footnote body ("*Vide ...")
            continue
        p = _ITALIC.sub(r"\1", p)
        p = _FOOTNOTE_MARK.sub("", p)
        p = normalise(p)
        if p:
            out.append(p)
    return out


def convert_novel(lines: list[str], name: str) -> list[list[str]]:
    # The modern editorial note at the end of Northanger Abbey is not Austen's text.
    for i, l in enumerate(lines):
        if l.strip().upper() == "A NOTE ON THE TEXT":
            lines = lines[:i]
            break
    chapters: list[list[str]] = []
    cur: list[str] | None = None  # None: front matter before the first chapter (dropped)
    for l in lines:
        if _CHAPTER.match(l):
            if cur is not None:
                chapters.append(cur)
            cur = []
        elif cur is not None and not _SKIP_LINE.match(l):
            cur.append(l.rstrip())
    if cur is not None:
        chapters.append(cur)
    docs = []
    for ch in chapters:
        paras: list[str] = []
        block: list[str] = []
        for l in ch + [""]:
            if l.strip():
                block.append(l)
            else:
                paras.extend(_austen_paragraphs(block))
                block = []
        if paras:
            docs.append(paras)
    if not docs:
        raise CorpusError(f"no chapters found in {name}")
    return docs


def extract_austen(pkg_root: Path, tmp: Path) -> tuple[list[list[str]], dict]:
    libdir = pkg_root / "usr" / "lib" / "R" / "site-library" / "janeaustenr"
    script = tmp / "dump_austen.R"
    script.write_text(R_DUMP)
    outdir = tmp / "austen"
    outdir.mkdir()
    env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8", HOME=str(tmp))
    run(["Rscript", "--vanilla", str(script), str(libdir), str(outdir)], capture_output=True, env=env)
    docs: list[list[str]] = []
    stats = {}
    for key, title in AUSTEN_NOVELS:
        path = outdir / f"{key}.txt"
        if not path.exists():
            raise CorpusError(f"janeaustenr data has no object {key!r}")
        text = path.read_bytes().decode("utf-8")  # strict: fail on anything that is not UTF-8
        novel = convert_novel(text.split("\n"), title)
        stats[title] = len(novel)
        docs.extend(novel)
    return docs, stats


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def render(docs: list[list[str]]) -> bytes:
    for d in docs:
        assert d and all(l and l == l.strip() and not any(c < " " for c in l) for l in d), d
    return ("\n\n".join("\n".join(d) for d in docs) + "\n").encode("utf-8")


def write_xz(path: Path, data: bytes) -> None:
    comp = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_FILTER_PRESET)
    assert lzma.decompress(comp) == data
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(comp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    ap.add_argument("--allow-other-versions", action="store_true",
                    help="proceed even if apt offers package versions other than the recorded ones")
    ap.add_argument("--keep-temp", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="electra_corpus_"))
    try:
        pkgs = download_packages(tmp, args.allow_other_versions)
        ensure_tools()
        bible_docs, bible_stats = extract_bible(pkgs["sword-text-web"]["root"] / "usr" / "share" / "sword", tmp)
        austen_docs, austen_stats = extract_austen(pkgs["r-cran-janeaustenr"]["root"], tmp)

        tools = tool_versions()
        specs = [
            {
                "file": "world_english_bible.txt.xz",
                "docs": bible_docs,
                "pkg": "sword-text-web",
                "description": (
                    "World English Bible with Deuterocanon (SWORD module engWEB2015eb, NRSVA versification), "
                    "one document per chapter, one verse per line; verse references, footnotes, cross references, "
                    "Strong's numbers and section headings removed; canonical psalm superscriptions kept as a line."
                ),
                "upstream": "https://ebible.org/web/",
                "license": "public domain",
                "license_note": "\"World English Bible\" is a trademark of eBible.org; the text here has footnotes and "
                                "headings removed. Debian packaging (debian/*) is GPL-2+ and not included.",
                "tools": {k: v for k, v in tools.items() if k != "r-base-core"},
            },
            {
                "file": "jane_austen.txt.xz",
                "docs": austen_docs,
                "pkg": "r-cran-janeaustenr",
                "description": (
                    "Jane Austen's six completed novels (Sense and Sensibility, Pride and Prejudice, Mansfield Park, "
                    "Emma, Northanger Abbey, Persuasion), one document per chapter, one paragraph per line; "
                    "headings, front matter and the modern editorial note removed, _italics_ markers stripped."
                ),
                "upstream": "https://cran.r-project.org/package=janeaustenr (texts from Project Gutenberg)",
                "license": "public domain",
                "license_note": "The novels are public domain; the janeaustenr R package (code, packaging) is MIT-licensed.",
                "tools": {k: v for k, v in tools.items() if k == "r-base-core"},
            },
        ]
        args.out.mkdir(parents=True, exist_ok=True)
        manifest = {"generator": "scripts/regenerate_corpus.py", "format": (
            "UTF-8 text, xz-compressed; one sentence/verse/paragraph per line, a single blank line between "
            "documents; 'lines' counts non-blank lines, 'bytes' is the uncompressed size."), "files": []}
        for s in specs:
            data = render(s["docs"])
            path = args.out / s["file"]
            write_xz(path, data)
            entry = {
                "file": s["file"],
                "sha256": sha256_file(path),
                "compressed_bytes": path.stat().st_size,
                "bytes": len(data),
                "documents": len(s["docs"]),
                "lines": sum(len(d) for d in s["docs"]),
                "source_package": s["pkg"],
                "source_version": pkgs[s["pkg"]]["version"],
                "source_deb_sha256": pkgs[s["pkg"]]["deb_sha256"],
                "distribution": "Debian 12 (bookworm)",
                "upstream": s["upstream"],
                "license": s["license"],
                "license_note": s["license_note"],
                "description": s["description"],
                "extraction_tools": s["tools"],
            }
            manifest["files"].append(entry)
            print(f"wrote {path} ({entry['compressed_bytes']} bytes xz, {entry['bytes']} bytes text, "
                  f"{entry['documents']} documents, {entry['lines']} lines)")
        (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        print(f"Bible: {len(bible_stats['books'])} books, {bible_stats['verse_slots']} verse slots, "
              f"{bible_stats['linked_skipped']} linked duplicates skipped, {bible_stats['empty_slots']} empty verses")
        print("Austen chapters: " + ", ".join(f"{k}: {v}" for k, v in austen_stats.items()))
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep_temp:
            print(f"temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
