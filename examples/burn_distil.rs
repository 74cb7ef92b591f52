//! A burn trainer that distils with our loss: a burn MLP teacher (64-256-10) trained with burn's
//! cross-entropy and Adam on the digits set, then a small student (64-16-10) trained with
//! `distillation::burn::kd_loss` in its step, beside the same student trained alone with burn's
//! cross-entropy. On the burn wgpu device shared with our kernels
//! (`distillation::burn::wgpu_device`: the loss runs on burn's buffers, no host copies; lavapipe
//! where there is no GPU), or burn's Flex CPU device with `--cpu`.
//!
//! ```text
//! cargo run --release --features burn --example burn_distil [-- --cpu]
//! ```

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::relu;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use distillation::data::Dataset;

#[derive(Module, Debug)]
struct Mlp {
    hidden: Linear,
    out: Linear,
}

impl Mlp {
    fn new(dim: usize, width: usize, classes: usize, dev: &Device) -> Self {
        Mlp {
            hidden: LinearConfig::new(dim, width).init(dev),
            out: LinearConfig::new(width, classes).init(dev),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.out.forward(relu(self.hidden.forward(x)))
    }
}

/// Rows `start..start + len` of a row-major `[n, width]` host matrix as a tensor.
fn rows(v: &[f32], width: usize, start: usize, len: usize, dev: &Device) -> Tensor<2> {
    let data = TensorData::new(
        v[start * width..(start + len) * width].to_vec(),
        [len, width],
    );
    Tensor::from_data(data, (dev, DType::F32))
}

fn labels(y: &[i64], dev: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(y.to_vec(), [y.len()]), dev)
}

fn accuracy(model: &Mlp, x: &[f32], y: &[i64], dim: usize, dev: &Device) -> f32 {
    let pred = model
        .forward(rows(x, dim, 0, y.len(), dev))
        .argmax(1)
        .try_into_vec_as::<i64>()
        .expect("read predictions");
    let right = pred.iter().zip(y).filter(|(p, t)| p == t).count();
    right as f32 / y.len() as f32
}

/// Trains `model` for `epochs` over mini-batches of 64 with `loss(logits, start, len)`.
fn train(
    mut model: Mlp,
    x: &[f32],
    n: usize,
    dim: usize,
    dev: &Device,
    loss: impl Fn(Tensor<2>, usize, usize) -> Tensor<1>,
) -> Mlp {
    let mut opt = AdamConfig::new().init();
    for _ in 0..30 {
        for start in (0..n).step_by(64) {
            let len = 64.min(n - start);
            let logits = model.forward(rows(x, dim, start, len, dev));
            let grads = GradientsParams::from_grads(loss(logits, start, len).backward(), &model);
            model = opt.step(3e-3, model, grads);
        }
    }
    model
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cpu = std::env::args().any(|a| a == "--cpu");
    let dev = if cpu {
        Device::flex().autodiff()
    } else {
        distillation::burn::wgpu_device()?.autodiff()
    };
    let data = Dataset::digits()?;
    let (dim, classes) = (data.dim, data.classes);
    let n = data.y.len();
    let split = n * 4 / 5; // the first 80% train, the rest test
    let y: Vec<i64> = data.y.iter().map(|&v| v as i64).collect();
    let (x_train, y_train) = (&data.x[..split * dim], &y[..split]);
    let (x_test, y_test) = (&data.x[split * dim..], &y[split..]);
    let ce = CrossEntropyLossConfig::new().init(&dev);

    let teacher = train(
        Mlp::new(dim, 256, classes, &dev),
        x_train,
        split,
        dim,
        &dev,
        |l, s, k| ce.forward(l, labels(&y_train[s..s + k], &dev)),
    );
    // The teacher's logits once, on the host: the soft targets.
    let soft = teacher
        .forward(rows(x_train, dim, 0, split, &dev))
        .try_into_vec_as::<f32>()?;

    let student = |distil: bool| -> f32 {
        let model = train(
            Mlp::new(dim, 16, classes, &dev),
            x_train,
            split,
            dim,
            &dev,
            |l, s, k| {
                let y = labels(&y_train[s..s + k], &dev);
                if distil {
                    let t = rows(&soft, classes, s, k, &dev);
                    distillation::burn::kd_loss(l, t, y, 4.0, 0.2).expect("kd_loss")
                } else {
                    ce.forward(l, y)
                }
            },
        );
        accuracy(&model, x_test, y_test, dim, &dev)
    };
    let t_acc = accuracy(&teacher, x_test, y_test, dim, &dev);
    let (d_acc, s_acc) = (student(true), student(false));
    let on = if cpu {
        "burn Flex CPU"
    } else {
        "burn wgpu, shared with our kernels"
    };
    println!("on {on}:");
    println!(
        "teacher (64-256-10, burn CE)               {:.2}%",
        100.0 * t_acc
    );
    println!(
        "student (64-16-10, our kd_loss, T 4, a 0.2) {:.2}%",
        100.0 * d_acc
    );
    println!(
        "student alone (64-16-10, burn CE)          {:.2}%",
        100.0 * s_acc
    );
    // 0 on the shared wgpu device: the loss never read a tensor to the host.
    println!(
        "tensors our loss read to the host: {}",
        distillation::burn::host_reads()
    );
    Ok(())
}
