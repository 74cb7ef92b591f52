"""The package's ctypes declarations agree with include/distillation.h (argument counts), and
its ABI version is the header's."""

import os
import re

import distillation
from distillation import _lib

HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "include", "distillation.h")


def header_arity():
    text = open(HEADER).read()
    out = {}
    for name, args in re.findall(r"int32_t (dst_\w+)\(([^)]*)\)", text):
        out[name] = 0 if args.strip() in ("", "void") else args.count(",") + 1
    return out


def test_declarations_match_the_header():
    arity = header_arity()
    h = _lib.lib()
    for name in ("dst_fast_hinton", "dst_fast_divergence", "dst_fast_cross_entropy",
                 "dst_fast_mse", "dst_cuda_create_on_stream", "dst_cuda_destroy",
                 "dst_cuda_synchronize", "dst_cuda_hinton", "dst_cuda_divergence",
                 "dst_cuda_cross_entropy", "dst_cuda_mse"):
        assert len(getattr(h, name).argtypes) == arity[name], name


def test_abi_version_is_the_headers():
    text = open(HEADER).read()
    want = int(re.search(r"#define DST_ABI_VERSION (\d+)", text).group(1))
    assert distillation.version()[0] == want == _lib.ABI_VERSION
