//! The record-into-encoder API on the caller's own wgpu buffers: nothing is submitted or read back
//! until the caller does it, and the gradient can overwrite the student logits.

use crate::common;

use common::{assert_close, to_f64, Lcg};
use distillation::backend::wgpu::{WgpuBuffer, WgpuLabels};
use distillation::wgpu::{self, util::DeviceExt};
use distillation::{ops, Backend, GradOut, HintonSpec, LossOut, RowShape};

#[test]
fn hinton_recorded_into_the_callers_encoder_in_place() {
    let Some(b) = common::wgpu() else { return };
    let (n, c) = (45, 1000);
    let mut g = Lcg(12);
    let (s, t) = (g.vec(n * c, 4.0), g.vec(n * c, 4.0));
    let labels: Vec<i32> = (0..n as i32)
        .map(|i| if i == 4 { -100 } else { (i * 31) % c as i32 })
        .collect();
    let device = b.device();
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let make = |data: &[u8]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: data,
            usage,
        })
    };
    // The caller's buffers, wrapped without copies.
    let sb = WgpuBuffer::from_buffer(make(bytemuck::cast_slice(&s)), n * c).unwrap();
    let tb = WgpuBuffer::from_buffer(make(bytemuck::cast_slice(&t)), n * c).unwrap();
    let lb = WgpuLabels::from_buffer(make(bytemuck::cast_slice(&labels)), n).unwrap();
    let loss = WgpuBuffer::from_buffer(make(bytemuck::cast_slice(&[f32::NAN])), 1).unwrap();
    let spec = HintonSpec::new(RowShape::new(n, c), 4.0, 0.3);
    let mut encoder = device.create_command_encoder(&Default::default());
    let out = LossOut {
        loss: &loss,
        row_loss: None,
        grad_student: GradOut::InPlace,
        grad_teacher: None,
    };
    b.recorder(&mut encoder)
        .hinton(&spec, &sb, &tb, &lb, out)
        .unwrap();
    // Nothing has run yet: the student is untouched until the caller submits.
    assert_eq!(b.download(&sb).unwrap(), s);
    b.queue().submit([encoder.finish()]);
    let want = ops::hinton::reference::hinton(&spec, &to_f64(&s), &to_f64(&t), &labels);
    assert_close("loss", &b.download(&loss).unwrap(), &[want.loss], 1e-4).unwrap();
    assert_close(
        "gradient over the student",
        &b.download(&sb).unwrap(),
        &want.grad_student,
        1e-4,
    )
    .unwrap();
}
