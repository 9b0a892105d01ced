import pytest

from op_testing import DEVICES


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
