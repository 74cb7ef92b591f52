//! Shared test machinery: the backends, the macro that runs one test body on each of them, and
//! tolerant comparisons against the f64 CPU reference.
#![allow(dead_code)]

use std::sync::OnceLock;

use distillation::backend::required;
use distillation::{Backend, CpuBackend, FastCpuBackend, WgpuBackend};

/// The process-wide wgpu backend, or `None` (printed as skipped) when no adapter exists and
/// `DISTILLATION_REQUIRE` does not list `wgpu`.
pub fn wgpu() -> Option<&'static WgpuBackend> {
    static B: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    let b = B.get_or_init(|| match WgpuBackend::new() {
        Ok(b) => {
            eprintln!("wgpu backend: {}", b.name());
            Some(b)
        }
        Err(e) => {
            assert!(
                !required("wgpu"),
                "DISTILLATION_REQUIRE lists wgpu, but: {e}"
            );
            None
        }
    });
    if b.is_none() {
        eprintln!(
            "skipped: no wgpu adapter (set DISTILLATION_REQUIRE=wgpu to make this a failure)"
        );
    }
    b.as_ref()
}

pub fn cpu() -> Option<&'static CpuBackend> {
    static B: CpuBackend = CpuBackend;
    Some(&B)
}

/// The fast CPU backend (f32 dense ops; the best matmul kernel this CPU has).
pub fn cpu_fast() -> Option<&'static FastCpuBackend> {
    static B: OnceLock<FastCpuBackend> = OnceLock::new();
    Some(B.get_or_init(FastCpuBackend::new))
}

#[cfg(feature = "cuda")]
pub fn cuda() -> Option<&'static distillation::CudaBackend> {
    static B: OnceLock<Option<distillation::CudaBackend>> = OnceLock::new();
    let b = B.get_or_init(|| match distillation::CudaBackend::new() {
        Ok(b) => {
            eprintln!("cuda backend: {}", b.name());
            Some(b)
        }
        Err(e) => {
            assert!(
                !required("cuda"),
                "DISTILLATION_REQUIRE lists cuda, but: {e}"
            );
            None
        }
    });
    if b.is_none() {
        eprintln!("skipped: no CUDA device (set DISTILLATION_REQUIRE=cuda to make this a failure)");
    }
    b.as_ref()
}

/// `backend_tests!(body_a, body_b, ...)` makes, for each generic `fn body<B: Backend>(b: &B)`,
/// a test `cpu::body`, `cpu_fast::body`, `wgpu::body` and (feature `cuda`) `cuda::body`.
#[macro_export]
macro_rules! backend_tests {
    ($($body:ident),* $(,)?) => {
        mod cpu {
            $( #[test] fn $body() { if let Some(b) = $crate::common::cpu() { super::$body(b) } } )*
        }
        mod cpu_fast {
            $( #[test] fn $body() { if let Some(b) = $crate::common::cpu_fast() { super::$body(b) } } )*
        }
        mod wgpu {
            $( #[test] fn $body() { if let Some(b) = $crate::common::wgpu() { super::$body(b) } } )*
        }
        #[cfg(feature = "cuda")]
        mod cuda {
            $( #[test] fn $body() { if let Some(b) = $crate::common::cuda() { super::$body(b) } } )*
        }
    };
}

/// Relative error of the norm, `||got - want|| / ||want||`, with NaN positions required to agree.
pub fn rel_err(got: &[f32], want: &[f64]) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!("length {} != {}", got.len(), want.len()));
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() != (g as f64).is_nan() {
            return Err(format!("element {i}: got {g}, want {w} (NaN mismatch)"));
        }
        if w.is_nan() || (w.is_infinite() && g as f64 == w) {
            continue;
        }
        if !g.is_finite() || w.is_infinite() {
            return Err(format!("element {i}: got {g}, want {w}"));
        }
        num += (g as f64 - w).powi(2);
        den += w * w;
    }
    Ok(if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    })
}

/// Asserts `got` matches `want` within relative error of the norm `tol` (absolute when `want` is 0).
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) -> Result<(), String> {
    assert_close_abs(what, got, want, tol, 0.0)
}

/// `||got - want|| <= tol ||want|| + atol sqrt(len)`: `atol` is a per-element floor for values whose
/// exact result is 0 or far below the f32 resolution of the quantities they are computed from.
pub fn assert_close_abs(
    what: &str,
    got: &[f32],
    want: &[f64],
    tol: f64,
    atol: f64,
) -> Result<(), String> {
    rel_err(got, want).map_err(|m| format!("{what}: {m}"))?;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want).filter(|(_, w)| w.is_finite()) {
        num += (g as f64 - w).powi(2);
        den += w * w;
    }
    let e = if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    };
    if num.sqrt() > tol * den.sqrt() + atol * (got.len() as f64).sqrt() {
        let worst = got
            .iter()
            .zip(want)
            .enumerate()
            .max_by(|a, b| {
                let da = (*a.1 .0 as f64 - a.1 .1).abs();
                let db = (*b.1 .0 as f64 - b.1 .1).abs();
                da.total_cmp(&db)
            })
            .map(|(i, (g, w))| format!("worst at {i}: got {g}, want {w}"))
            .unwrap_or_default();
        return Err(format!(
            "{what}: relative error {e:.3e} > {tol:.0e} ({worst})"
        ));
    }
    Ok(())
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// A small deterministic generator for inputs that proptest does not draw.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

/// One matmul on `b` from seeded random operands (C poisoned with NaN unless it accumulates),
/// checked against the f64 reference within `tol`; returns what `b` computed.
pub fn check_matmul<B: Backend>(
    b: &B,
    spec: distillation::ops::dense::MatmulSpec,
    seed: u64,
    tol: f64,
) -> Result<Vec<f32>, String> {
    let mut g = Lcg(seed);
    let (m, k, n) = (spec.m, spec.k, spec.n);
    let (a, bb, c0) = (g.vec(m * k, 1.0), g.vec(k * n, 1.0), g.vec(m * n, 1.0));
    let c = if spec.accumulate {
        b.upload(&c0).unwrap()
    } else {
        b.filled(m * n, f32::NAN).unwrap()
    };
    b.matmul(&spec, &b.upload(&a).unwrap(), &b.upload(&bb).unwrap(), &c)
        .map_err(|e| e.to_string())?;
    let mut want = to_f64(&c0);
    distillation::ops::dense::reference::matmul(&spec, &to_f64(&a), &to_f64(&bb), &mut want);
    let got = b.download(&c).unwrap();
    assert_close(
        &format!("matmul {spec:?} on {}", b.name()),
        &got,
        &want,
        tol,
    )?;
    Ok(got)
}
