//! A trainer that owns its wgpu device, buffers and command encoder: the fused Hinton loss is
//! recorded into the trainer's encoder on the trainer's buffers, its gradient written over the
//! student logits, with no submit or readback by the crate.
//!
//!   cargo run --release --example wgpu_trainer

use distillation::backend::wgpu::{WgpuBuffer, WgpuLabels};
use distillation::wgpu::{self, util::DeviceExt};
use distillation::{Backend, GradOut, HintonSpec, LossOut, RowShape, WgpuBackend};

fn main() -> distillation::Result<()> {
    let backend = WgpuBackend::new()?; // or share the trainer's device: see WgpuBackend::device()
    let (n, c) = (8, 100);
    let student: Vec<f32> = (0..n * c).map(|i| ((i * 7) % 13) as f32 * 0.3).collect();
    let teacher: Vec<f32> = (0..n * c).map(|i| ((i * 5) % 11) as f32 * 0.4).collect();
    let labels: Vec<i32> = (0..n as i32)
        .map(|i| if i == 3 { -100 } else { i * 11 % c as i32 })
        .collect();

    // The trainer's own buffers (usage STORAGE, plus COPY_SRC to read them back here).
    let device = backend.device();
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let make = |bytes: &[u8]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytes,
            usage,
        })
    };
    let s = WgpuBuffer::from_buffer(make(bytemuck::cast_slice(&student)), n * c)?;
    let t = WgpuBuffer::from_buffer(make(bytemuck::cast_slice(&teacher)), n * c)?;
    let y = WgpuLabels::from_buffer(make(bytemuck::cast_slice(&labels)), n)?;
    let loss = WgpuBuffer::from_buffer(make(bytemuck::cast_slice(&[0f32])), 1)?;

    // One training step's encoder: ... the forward pass would be recorded here ...
    let mut encoder = device.create_command_encoder(&Default::default());
    let out = LossOut {
        loss: &loss,
        row_loss: None,
        grad_student: GradOut::InPlace,
        grad_teacher: None,
    };
    backend.recorder(&mut encoder).hinton(
        &HintonSpec::new(RowShape::new(n, c), 4.0, 0.2),
        &s,
        &t,
        &y,
        out,
    )?;
    // ... and the backward pass would continue from the gradient now in `s`.
    backend.queue().submit([encoder.finish()]);

    let grad = backend.download(&s)?;
    println!(
        "loss {:.6}, dL/ds[0..4] = {:?}",
        backend.download(&loss)?[0],
        &grad[..4]
    );
    Ok(())
}
