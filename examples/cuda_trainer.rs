//! A trainer that owns its CUDA memory: its logits are `CudaSlice`s (or raw device pointers from
//! another framework), the crate's kernels run on the trainer's stream, and nothing synchronizes
//! until the trainer reads a result.
//!
//!   cargo run --release --example cuda_trainer    (needs an NVIDIA GPU, driver 580+, NVRTC 13)

use distillation::backend::cuda::{CudaBuffer, CudaLabels};
use distillation::{Backend, CudaBackend, GradOut, HintonSpec, LossOut, RowShape};

fn main() -> distillation::Result<()> {
    // Stream 0 (the legacy default stream) here; a trainer passes its own `cudaStream_t`.
    // SAFETY: 0 is always a valid stream of the device's primary context.
    let backend = match unsafe { CudaBackend::with_stream(0, 0) } {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{e}");
            return Ok(());
        }
    };
    let (n, c) = (8, 100);
    let student: Vec<f32> = (0..n * c).map(|i| ((i * 7) % 13) as f32 * 0.3).collect();
    let teacher: Vec<f32> = (0..n * c).map(|i| ((i * 5) % 11) as f32 * 0.4).collect();
    let labels: Vec<i32> = (0..n as i32).map(|i| i * 11 % c as i32).collect();

    // The trainer's own device memory, allocated with cudarc on the backend's stream.
    let stream = backend.stream();
    let device_err = |e| distillation::Error::Device {
        backend: "cuda",
        message: format!("{e:?}"),
    };
    let s = CudaBuffer::from_slice(stream.clone_htod(&student).map_err(device_err)?);
    let t = CudaBuffer::from_slice(stream.clone_htod(&teacher).map_err(device_err)?);
    let y = CudaLabels::from_slice(stream.clone_htod(&labels).map_err(device_err)?);
    let loss = backend.filled(1, 0.0)?;

    // The fused loss with its gradient written over the student logits; no synchronization.
    let out = LossOut {
        loss: &loss,
        row_loss: None,
        grad_student: GradOut::InPlace,
        grad_teacher: None,
    };
    backend.hinton(
        &HintonSpec::new(RowShape::new(n, c), 4.0, 0.2),
        &s,
        &t,
        &y,
        out,
    )?;

    // Reading back synchronizes the stream.
    let grad = backend.download(&s)?;
    println!(
        "loss {:.6}, dL/ds[0..4] = {:?}",
        backend.download(&loss)?[0],
        &grad[..4]
    );
    Ok(())
}
