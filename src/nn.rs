//! Layers and optimizers on top of the tape: `Linear` (Kaiming-uniform init from a seeded RNG, as
//! PyTorch's default), an MLP builder, and Adam / SGD whose update is one kernel per parameter.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::optim::{AdamSpec, SgdSpec};
use crate::rng::Rng;
use crate::tape::{Tape, Tensor, Var};

/// A trainable tensor with its optimizer state.
pub struct Param<B: Backend> {
    pub name: String,
    pub value: Tensor<B>,
    /// Adam's first moment or SGD's velocity.
    state1: Option<Tensor<B>>,
    /// Adam's second moment.
    state2: Option<Tensor<B>>,
}

impl<B: Backend> Param<B> {
    pub fn new(name: impl Into<String>, value: Tensor<B>) -> Self {
        Param {
            name: name.into(),
            value,
            state1: None,
            state2: None,
        }
    }

    pub fn len(&self) -> usize {
        self.value.len()
    }

    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }
}

/// `y = x W + b`, `W` stored `[in, out]`.
pub struct Linear<B: Backend> {
    pub weight: Param<B>,
    pub bias: Param<B>,
}

impl<B: Backend> Linear<B> {
    /// Kaiming-uniform with `a = sqrt(5)` (PyTorch's `nn.Linear` default): weights and biases
    /// uniform in `+-1/sqrt(in)`.
    pub fn new(
        backend: &B,
        name: &str,
        inputs: usize,
        outputs: usize,
        rng: &mut Rng,
    ) -> Result<Self> {
        if inputs == 0 || outputs == 0 {
            return Err(Error::Unsupported(format!(
                "Linear({inputs}, {outputs}): sizes must be >= 1"
            )));
        }
        let bound = 1.0 / (inputs as f64).sqrt();
        let w: Vec<f32> = (0..inputs * outputs)
            .map(|_| rng.range(-bound, bound) as f32)
            .collect();
        let b: Vec<f32> = (0..outputs)
            .map(|_| rng.range(-bound, bound) as f32)
            .collect();
        Ok(Linear {
            weight: Param::new(
                format!("{name}.weight"),
                Tensor::from_host(backend, &w, &[inputs, outputs])?,
            ),
            bias: Param::new(
                format!("{name}.bias"),
                Tensor::from_host(backend, &b, &[outputs])?,
            ),
        })
    }

    pub fn forward<'a>(&self, tape: &Tape<'a, B>, x: Var) -> Result<(Var, [Var; 2])>
    where
        B: 'a,
    {
        let w = tape.leaf(self.weight.value.clone());
        let b = tape.leaf(self.bias.value.clone());
        let y = tape.matmul(x, w)?;
        Ok((tape.bias_add(y, b)?, [w, b]))
    }

    pub fn inputs(&self) -> usize {
        self.weight.value.shape[0]
    }

    pub fn outputs(&self) -> usize {
        self.weight.value.shape[1]
    }
}

/// A multilayer perceptron: Linear, ReLU, ..., Linear (logits).
pub struct Mlp<B: Backend> {
    pub layers: Vec<Linear<B>>,
}

/// The variables of one forward pass: the logits, each hidden activation, and the parameters in
/// the order of [`Mlp::params`].
pub struct MlpForward {
    pub logits: Var,
    pub hidden: Vec<Var>,
    pub params: Vec<Var>,
}

impl<B: Backend> Mlp<B> {
    /// Sizes `[in, hidden.., out]`, e.g. `[64, 256, 256, 10]`.
    pub fn new(backend: &B, sizes: &[usize], rng: &mut Rng) -> Result<Self> {
        if sizes.len() < 2 {
            return Err(Error::Unsupported(format!(
                "an MLP needs at least [in, out] sizes, got {sizes:?}"
            )));
        }
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| Linear::new(backend, &format!("layers.{i}"), w[0], w[1], rng))
            .collect::<Result<_>>()?;
        Ok(Mlp { layers })
    }

    pub fn sizes(&self) -> Vec<usize> {
        let mut s = vec![self.layers[0].inputs()];
        s.extend(self.layers.iter().map(|l| l.outputs()));
        s
    }

    pub fn forward<'a>(&self, tape: &Tape<'a, B>, x: Var) -> Result<MlpForward>
    where
        B: 'a,
    {
        let mut h = x;
        let mut hidden = Vec::new();
        let mut params = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let (y, p) = layer.forward(tape, h)?;
            params.extend(p);
            h = if i + 1 < self.layers.len() {
                let a = tape.relu(y)?;
                hidden.push(a);
                a
            } else {
                y
            };
        }
        Ok(MlpForward {
            logits: h,
            hidden,
            params,
        })
    }

    pub fn params(&self) -> Vec<&Param<B>> {
        self.layers
            .iter()
            .flat_map(|l| [&l.weight, &l.bias])
            .collect()
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        self.layers
            .iter_mut()
            .flat_map(|l| [&mut l.weight, &mut l.bias])
            .collect()
    }

    pub fn parameter_count(&self) -> usize {
        self.params().iter().map(|p| p.len()).sum()
    }
}

/// Which optimizer, and its settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    Adam {
        lr: f32,
        weight_decay: f32,
    },
    Sgd {
        lr: f32,
        momentum: f32,
        weight_decay: f32,
    },
}

impl Optimizer {
    /// Adam with PyTorch's defaults (beta1 0.9, beta2 0.999, eps 1e-8).
    pub fn adam(lr: f32) -> Self {
        Optimizer::Adam {
            lr,
            weight_decay: 0.0,
        }
    }

    /// Applies one step (`step` counts from 1) to each parameter with its gradient from `tape`.
    pub fn step<'p, 'a, B>(
        &self,
        tape: &Tape<'a, B>,
        params: impl IntoIterator<Item = (&'p mut Param<B>, Var)>,
        step: u32,
    ) -> Result<()>
    where
        B: Backend + 'a + 'p,
    {
        let backend = tape.backend();
        for (p, v) in params {
            let Some(g) = tape.grad(v) else { continue };
            let shape = p.value.shape.clone();
            if p.state1.is_none() {
                p.state1 = Some(Tensor::zeros(backend, &shape)?);
            }
            match *self {
                Optimizer::Adam { lr, weight_decay } => {
                    if p.state2.is_none() {
                        p.state2 = Some(Tensor::zeros(backend, &shape)?);
                    }
                    let spec = AdamSpec {
                        weight_decay,
                        step,
                        ..AdamSpec::new(lr)
                    };
                    let (m, v) = (p.state1.as_ref().unwrap(), p.state2.as_ref().unwrap());
                    backend.adam_step(&spec, &p.value.buf, &g.buf, &m.buf, &v.buf)?;
                }
                Optimizer::Sgd {
                    lr,
                    momentum,
                    weight_decay,
                } => {
                    let spec = SgdSpec {
                        lr,
                        momentum,
                        weight_decay,
                    };
                    backend.sgd_step(
                        &spec,
                        &p.value.buf,
                        &g.buf,
                        &p.state1.as_ref().unwrap().buf,
                    )?;
                }
            }
        }
        Ok(())
    }
}
