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

    /// `[in, hidden.., out]` (empty for an MLP of no layers).
    pub fn sizes(&self) -> Vec<usize> {
        let Some(first) = self.layers.first() else {
            return Vec::new();
        };
        let mut s = vec![first.inputs()];
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

/// A 2-D convolution, channels-last: `weight` `[K*K*C_in, C_out]` (rows ordered `(ky, kx, c)`),
/// `bias` `[C_out]`, stride 1, padding `k / 2` ("same").
pub struct Conv2d<B: Backend> {
    pub weight: Param<B>,
    pub bias: Param<B>,
    pub k: usize,
}

impl<B: Backend> Conv2d<B> {
    /// Kaiming-uniform (`a = sqrt(5)`, PyTorch's `nn.Conv2d` default): uniform in
    /// `+-1/sqrt(C_in K K)`.
    pub fn new(
        backend: &B,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        rng: &mut Rng,
    ) -> Result<Self> {
        if cin == 0 || cout == 0 || k == 0 {
            return Err(Error::Unsupported(format!(
                "Conv2d({cin}, {cout}, {k}): sizes must be >= 1"
            )));
        }
        let fan_in = cin * k * k;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let w: Vec<f32> = (0..fan_in * cout)
            .map(|_| rng.range(-bound, bound) as f32)
            .collect();
        let b: Vec<f32> = (0..cout).map(|_| rng.range(-bound, bound) as f32).collect();
        Ok(Conv2d {
            weight: Param::new(
                format!("{name}.weight"),
                Tensor::from_host(backend, &w, &[fan_in, cout])?,
            ),
            bias: Param::new(
                format!("{name}.bias"),
                Tensor::from_host(backend, &b, &[cout])?,
            ),
            k,
        })
    }

    pub fn forward<'a>(&self, tape: &Tape<'a, B>, x: Var) -> Result<(Var, [Var; 2])>
    where
        B: 'a,
    {
        let w = tape.leaf(self.weight.value.clone());
        let b = tape.leaf(self.bias.value.clone());
        Ok((tape.conv2d(x, w, b, self.k, 1, self.k / 2)?, [w, b]))
    }

    pub fn out_channels(&self) -> usize {
        self.weight.value.shape[1]
    }

    /// `C_in`, from the weight's `K*K*C_in` rows (0 for a kernel size of 0).
    pub fn in_channels(&self) -> usize {
        self.weight
            .value
            .shape
            .first()
            .map_or(0, |&r| r.checked_div(self.k * self.k).unwrap_or(0))
    }
}

/// A small CNN: blocks of 3x3 conv, ReLU and 2x2 max-pooling (while the image is at least 2x2),
/// then a Linear head on the flattened maps.
pub struct Cnn<B: Backend> {
    pub convs: Vec<Conv2d<B>>,
    pub head: Linear<B>,
    /// `(channels, height, width)` of the input images.
    pub image: (usize, usize, usize),
}

impl<B: Backend> Cnn<B> {
    pub fn new(
        backend: &B,
        image: (usize, usize, usize),
        channels: &[usize],
        classes: usize,
        rng: &mut Rng,
    ) -> Result<Self> {
        let (mut c, mut h, mut w) = image;
        let mut convs = Vec::new();
        for (i, &oc) in channels.iter().enumerate() {
            convs.push(Conv2d::new(backend, &format!("convs.{i}"), c, oc, 3, rng)?);
            c = oc;
            if h >= 2 && w >= 2 {
                h /= 2;
                w /= 2;
            }
        }
        let head = Linear::new(backend, "head", c * h * w, classes, rng)?;
        Ok(Cnn { convs, head, image })
    }

    pub fn forward<'a>(&self, tape: &Tape<'a, B>, x: Var) -> Result<NetForward>
    where
        B: 'a,
    {
        let (c, h, w) = self.image;
        let n = tape.value(x)?.rows_cols().0;
        // Rows hold [C, H, W] images; the convolutions are channels-last.
        let mut a = tape.reshape(x, &[n, c, h * w])?;
        a = if c > 1 {
            let t = tape.to_channels_first(tape.reshape(a, &[n, c, 1, h * w])?)?; // [n, hw, 1, c]
            tape.reshape(t, &[n, h, w, c])?
        } else {
            tape.reshape(a, &[n, h, w, c])?
        };
        let (mut hidden, mut maps, mut params) = (Vec::new(), Vec::new(), Vec::new());
        for conv in &self.convs {
            let (y, p) = conv.forward(tape, a)?;
            params.extend(p);
            let y = tape.relu(y)?;
            maps.push(tape.to_channels_first(y)?);
            hidden.push(y);
            let s = tape.value(y)?.shape.clone();
            a = if s[1] >= 2 && s[2] >= 2 {
                tape.pool(y, 2, true)?
            } else {
                y
            };
        }
        let len = tape.value(a)?.len() / n;
        let flat = tape.reshape(a, &[n, len])?;
        let (logits, p) = self.head.forward(tape, flat)?;
        params.extend(p);
        Ok(NetForward {
            logits,
            hidden,
            maps,
            params,
        })
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        let mut v: Vec<&mut Param<B>> = self
            .convs
            .iter_mut()
            .flat_map(|c| [&mut c.weight, &mut c.bias])
            .collect();
        v.extend([&mut self.head.weight, &mut self.head.bias]);
        v
    }

    pub fn params(&self) -> Vec<&Param<B>> {
        let mut v: Vec<&Param<B>> = self
            .convs
            .iter()
            .flat_map(|c| [&c.weight, &c.bias])
            .collect();
        v.extend([&self.head.weight, &self.head.bias]);
        v
    }

    pub fn parameter_count(&self) -> usize {
        self.convs
            .iter()
            .map(|c| c.weight.len() + c.bias.len())
            .sum::<usize>()
            + self.head.weight.len()
            + self.head.bias.len()
    }
}

/// The variables of one forward pass of a [`Net`]: logits; the hidden activations (an MLP's layers
/// after ReLU, a CNN's conv blocks after ReLU, channels-last); the CNN's maps `[N, C, H, W]` for
/// attention transfer; and the parameters in the order of `params_mut`.
pub struct NetForward {
    pub logits: Var,
    pub hidden: Vec<Var>,
    pub maps: Vec<Var>,
    pub params: Vec<Var>,
}

/// A network the pipeline trains.
pub enum Net<B: Backend> {
    Mlp(Mlp<B>),
    Cnn(Box<Cnn<B>>),
}

impl<B: Backend> Net<B> {
    pub fn forward<'a>(&self, tape: &Tape<'a, B>, x: Var) -> Result<NetForward>
    where
        B: 'a,
    {
        match self {
            Net::Mlp(m) => {
                let f = m.forward(tape, x)?;
                Ok(NetForward {
                    logits: f.logits,
                    hidden: f.hidden,
                    maps: Vec::new(),
                    params: f.params,
                })
            }
            Net::Cnn(c) => c.forward(tape, x),
        }
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        match self {
            Net::Mlp(m) => m.params_mut(),
            Net::Cnn(c) => c.params_mut(),
        }
    }

    /// The parameters, in the order of [`Net::params_mut`].
    pub fn params(&self) -> Vec<&Param<B>> {
        match self {
            Net::Mlp(m) => m.params(),
            Net::Cnn(c) => c.params(),
        }
    }

    pub fn parameter_count(&self) -> usize {
        match self {
            Net::Mlp(m) => m.parameter_count(),
            Net::Cnn(c) => c.parameter_count(),
        }
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
            let Some(g) = tape.grad(v)? else { continue };
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
