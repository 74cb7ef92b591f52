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

/// Two windows of one wgpu::Buffer as a recorded kernel's input and output: wgpu would report the
/// usage conflict only at the caller's `finish()` (a panic), so the recorder refuses it; the
/// backend finishes its own encoder inside its error scope.
#[test]
fn a_recorded_kernel_refuses_windows_of_one_buffer() {
    use distillation::ops::dense::CopySpec;
    let Some(b) = common::wgpu() else { return };
    let align = (b.limits().min_storage_buffer_offset_alignment as usize / 4).max(1);
    let slot = 8usize.div_ceil(align) * align;
    let whole = b.upload(&vec![1.0f32; 2 * slot]).unwrap();
    let window = |k: usize| {
        b.wrap_buffer(
            whole.buffer().clone(),
            (k * slot * 4) as u64,
            8,
            distillation::Dtype::F32,
        )
        .unwrap()
    };
    let (src, dst) = (window(0), window(1));
    let spec = CopySpec::contiguous(8, 0, 0);
    let mut encoder = b.device().create_command_encoder(&Default::default());
    let e = b
        .recorder(&mut encoder)
        .copy_rows(&spec, &src, &dst)
        .unwrap_err();
    assert!(matches!(e, distillation::Error::Alias(_)), "{e}");
    drop(encoder);
    // The backend's own call: an error or a copy (wgpu validates inside its error scope), never
    // a panic.
    let _ = b.copy_rows(&spec, &src, &dst);
}
