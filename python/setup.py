"""Builds the crate's cdylib into the package (see pyproject.toml): `pip install ./python`."""

import os

from setuptools import setup
from setuptools_rust import Binding, RustExtension

HERE = os.path.dirname(os.path.abspath(__file__))

setup(
    rust_extensions=[
        RustExtension(
            # The shared library lands at distillation/_native*.so; distillation/_lib.py finds it
            # next to itself (no environment variable).
            "distillation._native",
            path=os.path.join(HERE, "..", "Cargo.toml"),
            binding=Binding.NoBinding,
            # The crate's default features: CUDA through NVRTC and the driver, both loaded at
            # run time, so the library loads on machines without CUDA too.
            # Extra cargo features, comma-separated, from DISTILLATION_CARGO_FEATURES (.ci/run
            # builds with the features its `cargo test` used, so the build reuses that one).
            features=[f for f in os.environ.get("DISTILLATION_CARGO_FEATURES", "").split(",") if f],
            py_limited_api=False,
            debug=False,
        )
    ],
    zip_safe=False,
)
