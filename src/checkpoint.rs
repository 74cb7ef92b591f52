//! Networks read back from safetensors checkpoints: a teacher trained elsewhere (`distill
//! --teacher FILE`), or one this crate saved ([`crate::report::save_net`], `--save-teacher`).
//!
//! Two layouts are read, the two [`crate::report::save_net`] writes:
//!
//! - an MLP as PyTorch saves `nn.Sequential(nn.Linear, nn.ReLU, nn.Linear, ..., nn.Linear)`:
//!   `0.weight` `[out, in]`, `0.bias` `[out]`, `2.weight`, `2.bias`, ... (a Linear at every even
//!   index, the ReLU between them has no tensors), at least two Linear layers, and no other
//!   tensor. The activations cannot be seen in a state dict: they are taken to be ReLU;
//! - the crate's CNN: `convs.{i}.weight` `[C_out, C_in, 3, 3]` (PyTorch's `nn.Conv2d` layout),
//!   `convs.{i}.bias`, then `head.weight` `[classes, inputs]` and `head.bias`, where the head's
//!   inputs are the last block's maps flattened channels-last, `(h, w, c)` (this crate's order,
//!   not PyTorch's `(c, h, w)`), each block a 3x3 "same" convolution, ReLU and 2x2 max-pooling
//!   (while the maps are at least 2x2).
//!
//! Tensors are F32, or F64 / F16 / BF16 converted to f32; every value must be finite. Shapes are
//! checked against each other when the file is read ([`Checkpoint::load`]) and against the data
//! (input features, image channels and size, classes) by [`Checkpoint::check`], which
//! `Config::validate` runs; each error names the tensor, its shape and the shape expected.
//!
//! (Over 600 lines on purpose: the two layouts, their error messages for every malformed tensor and
//! the mapping onto [`crate::nn`] are one format's reader; split, each half would need the other.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::Serialize;

use crate::backend::Backend;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::experiment::ModelKind;
use crate::nn::{Cnn, Conv2d, Linear, Mlp, Net, Param};
use crate::tape::Tensor;

/// The architecture of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Layer sizes `[in, hidden.., out]`.
    Mlp { sizes: Vec<usize> },
    /// Image channels in, each conv block's channels, the head's inputs and outputs.
    Cnn {
        in_channels: usize,
        channels: Vec<usize>,
        head_inputs: usize,
        classes: usize,
    },
}

/// One tensor in this crate's layout (`Linear` weights `[in, out]`, conv weights
/// `[(ky, kx, C_in), C_out]`).
#[derive(Clone)]
struct Loaded {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// A network's weights read from a safetensors file, checked for shape and finiteness, in this
/// crate's layouts. [`Checkpoint::build`] makes a [`Net`] of them on a backend (once per fold: a
/// network stays on the thread that built it).
#[derive(Clone)]
pub struct Checkpoint {
    file: PathBuf,
    arch: Architecture,
    /// In the order of [`Net::params`].
    tensors: Vec<Loaded>,
    /// The file's dtypes, e.g. `F32` or `F16 (converted to f32)`.
    dtype: String,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("file", &self.file)
            .field("architecture", &self.describe())
            .field("parameters", &self.parameter_count())
            .field("dtype", &self.dtype)
            .finish()
    }
}

/// In `results.json`: where the teacher came from and what it is, not its weights.
impl Serialize for Checkpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Checkpoint", 4)?;
        st.serialize_field("file", &self.file.display().to_string())?;
        st.serialize_field("architecture", &self.describe())?;
        st.serialize_field("parameters", &self.parameter_count())?;
        st.serialize_field("dtype", &self.dtype)?;
        st.end()
    }
}

/// An error in the file itself.
fn bad(file: &Path, problem: impl std::fmt::Display) -> Error {
    Error::io("load", file, problem)
}

const MLP_LAYOUT: &str =
    "the MLP layout is PyTorch's nn.Sequential(nn.Linear, nn.ReLU, nn.Linear, \
                          ..., nn.Linear) state dict: keys 0.weight [out, in], 0.bias [out], \
                          2.weight, 2.bias, ... and no others";
const CNN_LAYOUT: &str = "the CNN layout is the crate's (as --save-teacher writes it): \
                          convs.{i}.weight [C_out, C_in, 3, 3], convs.{i}.bias [C_out], \
                          head.weight [classes, inputs], head.bias [classes]";

/// IEEE half precision to f32 (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    match exp {
        0 => sign * man as f32 * (-24f32).exp2(),
        0x1f if man == 0 => sign * f32::INFINITY,
        0x1f => f32::NAN,
        _ => f32::from_bits(((h as u32 & 0x8000) << 16) | ((exp + 112) << 23) | (man << 13)),
    }
}

/// The tensor `name` of `st` as f32 values with its shape; `expected` describes the shape wanted
/// (for the message when the tensor is missing).
fn tensor(
    st: &SafeTensors<'_>,
    file: &Path,
    name: &str,
    expected: &str,
    why: &str,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let view = st.tensor(name).map_err(|_| {
        bad(
            file,
            format!("missing tensor {name} (expected shape {expected}): {why}"),
        )
    })?;
    let shape = view.shape().to_vec();
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        other => {
            return Err(bad(
                file,
                format!(
                    "tensor {name} has dtype {other}: only F32, F64, F16 and BF16 weights are \
                     read (save a float model: model.float() before save_file)"
                ),
            ))
        }
    };
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if count != Some(values.len()) {
        return Err(bad(
            file,
            format!(
                "tensor {name} holds {} values for its shape {shape:?}: the file is damaged",
                values.len()
            ),
        ));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(bad(
            file,
            format!(
                "tensor {name} (shape {shape:?}) has a non-finite value at flat index {i} ({} \
                 as f32): the weights must be finite",
                values[i]
            ),
        ));
    }
    Ok((shape, values))
}

/// `[out, in]` (PyTorch's `nn.Linear`) to `[in, out]` (ours).
fn from_pytorch_linear(w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for o in 0..out {
        for i in 0..inp {
            t[i * out + o] = w[o * inp + i];
        }
    }
    t
}

/// The shape `[a, b]` as text, `_` for a size not constrained.
fn dims(d: &[Option<usize>]) -> String {
    let parts: Vec<String> = d
        .iter()
        .map(|v| v.map_or("_".into(), |v| v.to_string()))
        .collect();
    format!("[{}]", parts.join(", "))
}

impl Checkpoint {
    /// Reads and checks a checkpoint: [`Error::Io`] for a file that cannot be read, is not
    /// safetensors, or whose tensors are missing, unexpected, of the wrong dtype, non-finite or
    /// of shapes that do not chain; each message names the tensor and the shape expected.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::io(
                "read",
                path,
                format!("{e} (check the path of the teacher checkpoint)"),
            )
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// [`Checkpoint::load`] on a file's bytes (`file` names it in messages).
    pub fn from_bytes(bytes: &[u8], file: &Path) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            bad(
                file,
                format!(
                    "not a safetensors file ({e}): save the teacher with \
                     safetensors.torch.save_file(model.state_dict(), path) (a torch.save .pt \
                     file is not one)"
                ),
            )
        })?;
        let names: BTreeSet<String> = st.names().into_iter().map(String::from).collect();
        let dtypes: BTreeSet<String> = st.iter().map(|(_, v)| v.dtype().to_string()).collect();
        let dtypes: Vec<String> = dtypes.into_iter().collect();
        let dtype = if dtypes == ["F32"] {
            "F32".to_string()
        } else {
            format!("{} (converted to f32)", dtypes.join(", "))
        };
        let (arch, tensors) = if names.contains("0.weight") {
            Self::read_mlp(&st, &names, file)?
        } else if names.contains("convs.0.weight") {
            Self::read_cnn(&st, &names, file)?
        } else {
            let prefix = names
                .iter()
                .find_map(|n| n.strip_suffix("0.weight").filter(|p| p.ends_with('.')))
                .map_or(String::new(), |p| {
                    format!(
                        "; its keys start with {p:?}: save the nn.Sequential itself (for \
                         example model.{}.state_dict()), or strip the prefix",
                        p.trim_end_matches('.')
                    )
                });
            let shown: Vec<&String> = names.iter().take(8).collect();
            return Err(bad(
                file,
                format!(
                    "neither 0.weight (an MLP) nor convs.0.weight (a CNN) is in the file, \
                     whose tensors are {shown:?}{}{prefix}; {MLP_LAYOUT}",
                    if names.len() > 8 { " ..." } else { "" }
                ),
            ));
        };
        Ok(Checkpoint {
            file: file.to_path_buf(),
            arch,
            tensors,
            dtype,
        })
    }

    fn unexpected(
        names: &BTreeSet<String>,
        used: &BTreeSet<String>,
        st: &SafeTensors<'_>,
        file: &Path,
        layout: &str,
    ) -> Result<()> {
        if let Some(extra) = names.difference(used).next() {
            let shape = st
                .tensor(extra)
                .map(|v| v.shape().to_vec())
                .unwrap_or_default();
            return Err(bad(
                file,
                format!(
                    "unexpected tensor {extra} (shape {shape:?}): {layout} (a Dropout or other \
                     layer shifts the indices, a BatchNorm adds tensors, a Linear without a ReLU \
                     after it cannot be told apart)"
                ),
            ));
        }
        Ok(())
    }

    fn read_mlp(
        st: &SafeTensors<'_>,
        names: &BTreeSet<String>,
        file: &Path,
    ) -> Result<(Architecture, Vec<Loaded>)> {
        let mut used = BTreeSet::new();
        let mut sizes: Vec<usize> = Vec::new();
        let mut tensors = Vec::new();
        let mut prev_name = String::new();
        for i in 0.. {
            let wn = format!("{}.weight", 2 * i);
            let bn = format!("{}.bias", 2 * i);
            if !names.contains(&wn) {
                break;
            }
            let prev = sizes.last().copied();
            let (shape, w) = tensor(st, file, &wn, "[out, in]", MLP_LAYOUT)?;
            let fits = shape.len() == 2 && shape[0] > 0 && shape[1] > 0;
            if !fits || prev.is_some_and(|p| p != shape[1]) {
                let expected = dims(&[None, prev]);
                let why = match prev {
                    Some(p) => format!(
                        "a Linear weight [out, in] whose inputs are the {p} outputs of {prev_name}"
                    ),
                    None => "a Linear weight [out, in]".to_string(),
                };
                return Err(bad(
                    file,
                    format!("tensor {wn} has shape {shape:?}, expected {expected}: {why}"),
                ));
            }
            let (out, inp) = (shape[0], shape[1]);
            let (bshape, b) = tensor(
                st,
                file,
                &bn,
                &format!("[{out}]"),
                "every Linear layer needs its bias (bias=True, PyTorch's default)",
            )?;
            if bshape != [out] {
                return Err(bad(
                    file,
                    format!(
                        "tensor {bn} has shape {bshape:?}, expected [{out}]: one bias for each \
                         of the {out} outputs of {wn}"
                    ),
                ));
            }
            if sizes.is_empty() {
                sizes.push(inp);
            }
            sizes.push(out);
            tensors.push(Loaded {
                name: format!("layers.{i}.weight"),
                shape: vec![inp, out],
                values: from_pytorch_linear(&w, out, inp),
            });
            tensors.push(Loaded {
                name: format!("layers.{i}.bias"),
                shape: vec![out],
                values: b,
            });
            used.insert(wn.clone());
            used.insert(bn);
            prev_name = wn;
        }
        Self::unexpected(names, &used, st, file, MLP_LAYOUT)?;
        if sizes.len() < 3 {
            return Err(bad(
                file,
                format!(
                    "one Linear layer ({prev_name}, shape [{}, {}]) and no hidden layer: the \
                     pipeline's networks have at least one hidden layer (0.weight, then \
                     2.weight after a ReLU)",
                    sizes[1], sizes[0]
                ),
            ));
        }
        Ok((Architecture::Mlp { sizes }, tensors))
    }

    fn read_cnn(
        st: &SafeTensors<'_>,
        names: &BTreeSet<String>,
        file: &Path,
    ) -> Result<(Architecture, Vec<Loaded>)> {
        let mut used = BTreeSet::new();
        let mut channels: Vec<usize> = Vec::new();
        let mut in_channels = 0;
        let mut tensors = Vec::new();
        for i in 0.. {
            let wn = format!("convs.{i}.weight");
            let bn = format!("convs.{i}.bias");
            if !names.contains(&wn) {
                break;
            }
            let prev = channels.last().copied();
            let (shape, w) = tensor(st, file, &wn, "[C_out, C_in, 3, 3]", CNN_LAYOUT)?;
            let fits = shape.len() == 4
                && shape[0] > 0
                && shape[1] > 0
                && shape[2] == 3
                && shape[3] == 3
                && prev.is_none_or(|p| p == shape[1]);
            if !fits {
                let expected = dims(&[None, prev, Some(3), Some(3)]);
                let why = match prev {
                    Some(p) => format!(
                        "a 3x3 convolution [C_out, C_in, 3, 3] taking the {p} channels of \
                         convs.{}.weight",
                        i - 1
                    ),
                    None => "a 3x3 convolution [C_out, C_in, 3, 3]".to_string(),
                };
                return Err(bad(
                    file,
                    format!("tensor {wn} has shape {shape:?}, expected {expected}: {why}"),
                ));
            }
            let (cout, cin, k) = (shape[0], shape[1], 3);
            let (bshape, b) = tensor(
                st,
                file,
                &bn,
                &format!("[{cout}]"),
                "every convolution needs its bias",
            )?;
            if bshape != [cout] {
                return Err(bad(
                    file,
                    format!("tensor {bn} has shape {bshape:?}, expected [{cout}]: one bias per output channel of {wn}"),
                ));
            }
            if i == 0 {
                in_channels = cin;
            }
            // [C_out, C_in, K, K] to [(ky, kx, C_in), C_out].
            let mut ours = vec![0f32; w.len()];
            for co in 0..cout {
                for ci in 0..cin {
                    for ky in 0..k {
                        for kx in 0..k {
                            ours[((ky * k + kx) * cin + ci) * cout + co] =
                                w[((co * cin + ci) * k + ky) * k + kx];
                        }
                    }
                }
            }
            channels.push(cout);
            tensors.push(Loaded {
                name: format!("convs.{i}.weight"),
                shape: vec![k * k * cin, cout],
                values: ours,
            });
            tensors.push(Loaded {
                name: format!("convs.{i}.bias"),
                shape: vec![cout],
                values: b,
            });
            used.insert(wn);
            used.insert(bn);
        }
        let (shape, w) = tensor(st, file, "head.weight", "[classes, inputs]", CNN_LAYOUT)?;
        if shape.len() != 2 || shape[0] == 0 || shape[1] == 0 {
            return Err(bad(
                file,
                format!(
                    "tensor head.weight has shape {shape:?}, expected [classes, inputs]: the \
                     linear head"
                ),
            ));
        }
        let (classes, head_inputs) = (shape[0], shape[1]);
        let (bshape, b) = tensor(
            st,
            file,
            "head.bias",
            &format!("[{classes}]"),
            "the head needs its bias",
        )?;
        if bshape != [classes] {
            return Err(bad(
                file,
                format!(
                    "tensor head.bias has shape {bshape:?}, expected [{classes}]: one bias per \
                     output of head.weight"
                ),
            ));
        }
        tensors.push(Loaded {
            name: "head.weight".into(),
            shape: vec![head_inputs, classes],
            values: from_pytorch_linear(&w, classes, head_inputs),
        });
        tensors.push(Loaded {
            name: "head.bias".into(),
            shape: vec![classes],
            values: b,
        });
        used.insert("head.weight".to_string());
        used.insert("head.bias".to_string());
        Self::unexpected(names, &used, st, file, CNN_LAYOUT)?;
        Ok((
            Architecture::Cnn {
                in_channels,
                channels,
                head_inputs,
                classes,
            },
            tensors,
        ))
    }

    /// The file it was read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// The model family, for `Config::model`.
    pub fn kind(&self) -> ModelKind {
        match self.arch {
            Architecture::Mlp { .. } => ModelKind::Mlp,
            Architecture::Cnn { .. } => ModelKind::Cnn,
        }
    }

    /// The hidden layer sizes (MLP) or the conv blocks' channels (CNN): what
    /// `Config::teacher_hidden` / `teacher_channels` hold for this teacher.
    pub fn hidden(&self) -> Vec<usize> {
        match &self.arch {
            Architecture::Mlp { sizes } => sizes[1..sizes.len() - 1].to_vec(),
            Architecture::Cnn { channels, .. } => channels.clone(),
        }
    }

    /// One line: `mlp [64, 256, 256, 10]`, `cnn channels [32, 64], head 1024 -> 10`.
    pub fn describe(&self) -> String {
        match &self.arch {
            Architecture::Mlp { sizes } => format!("mlp {sizes:?}"),
            Architecture::Cnn {
                in_channels,
                channels,
                head_inputs,
                classes,
            } => format!(
                "cnn {in_channels} channels in, blocks {channels:?}, head {head_inputs} -> {classes}"
            ),
        }
    }

    /// The file's dtypes (`F32`, or e.g. `F16 (converted to f32)`).
    pub fn dtype(&self) -> &str {
        &self.dtype
    }

    pub fn parameter_count(&self) -> usize {
        self.tensors.iter().map(|t| t.values.len()).sum()
    }

    /// Checks the network against the data: [`Error::Config`] naming the tensor and the shape
    /// the data needs when its inputs (features, or image channels and size) or its outputs (the
    /// data's classes) do not fit.
    pub fn check(&self, data: &Dataset) -> Result<()> {
        let f = self.file.display();
        let classes_hint = format!(
            "one logit for each of the data's {} classes (labels 0..={})",
            data.classes,
            data.classes.saturating_sub(1)
        );
        match &self.arch {
            Architecture::Mlp { sizes } => {
                if sizes[0] != data.dim {
                    return Err(Error::Config(format!(
                        "teacher {f}: tensor 0.weight has shape [{}, {}], expected [{}, {}]: the \
                         first layer must take the data's {} features",
                        sizes[1], sizes[0], sizes[1], data.dim, data.dim
                    )));
                }
                let (inp, out) = (sizes[sizes.len() - 2], sizes[sizes.len() - 1]);
                if out != data.classes {
                    let last = 2 * (sizes.len() - 2);
                    return Err(Error::Config(format!(
                        "teacher {f}: tensor {last}.weight has shape [{out}, {inp}], expected \
                         [{}, {inp}]: the last layer must give {classes_hint}",
                        data.classes
                    )));
                }
            }
            Architecture::Cnn {
                in_channels,
                channels,
                head_inputs,
                classes,
            } => {
                let Some((c, mut h, mut w)) = data.image else {
                    return Err(Error::Config(format!(
                        "teacher {f} is a CNN, which needs image data: with --data FILE.csv \
                         give --image-shape HxW (or CxHxW)"
                    )));
                };
                if *in_channels != c {
                    return Err(Error::Config(format!(
                        "teacher {f}: tensor convs.0.weight has shape [{}, {in_channels}, 3, 3], \
                         expected [{}, {c}, 3, 3]: the images have {c} channel(s)",
                        channels[0], channels[0]
                    )));
                }
                for _ in channels {
                    if h >= 2 && w >= 2 {
                        h /= 2;
                        w /= 2;
                    }
                }
                let last = channels.last().copied().unwrap_or(c);
                let want = last * h * w;
                if *head_inputs != want {
                    return Err(Error::Config(format!(
                        "teacher {f}: tensor head.weight has shape [{classes}, {head_inputs}], \
                         expected [{classes}, {want}]: the head takes the last block's {last} \
                         maps of {h}x{w} for these images"
                    )));
                }
                if *classes != data.classes {
                    return Err(Error::Config(format!(
                        "teacher {f}: tensor head.weight has shape [{classes}, {head_inputs}], \
                         expected [{}, {head_inputs}]: the head must give {classes_hint}",
                        data.classes
                    )));
                }
            }
        }
        Ok(())
    }

    /// The network on `backend`, with the checkpoint's weights (checked against `data` first).
    pub fn build<B: Backend>(&self, backend: &B, data: &Dataset) -> Result<Net<B>> {
        self.check(data)?;
        let mut params = self
            .tensors
            .iter()
            .map(|t| {
                Ok(Param::new(
                    t.name.clone(),
                    Tensor::from_host(backend, &t.values, &t.shape)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter();
        let mut next = || {
            params
                .next()
                .ok_or_else(|| Error::Unsupported("a checkpoint with a missing tensor".into()))
        };
        match &self.arch {
            Architecture::Mlp { sizes } => {
                let mut layers = Vec::new();
                for _ in 1..sizes.len() {
                    layers.push(Linear {
                        weight: next()?,
                        bias: next()?,
                    });
                }
                Ok(Net::Mlp(Mlp { layers }))
            }
            Architecture::Cnn { channels, .. } => {
                let image = data
                    .image
                    .ok_or_else(|| Error::Config("a CNN teacher needs image data".into()))?;
                let mut convs = Vec::new();
                for _ in channels {
                    convs.push(Conv2d {
                        weight: next()?,
                        bias: next()?,
                        k: 3,
                    });
                }
                let head = Linear {
                    weight: next()?,
                    bias: next()?,
                };
                Ok(Net::Cnn(Box::new(Cnn { convs, head, image })))
            }
        }
    }
}
