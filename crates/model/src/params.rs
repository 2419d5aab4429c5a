//! Where a model's tensors come from: a safetensors file (Hugging Face layout, checked
//! tensor by tensor) or a seeded random init. Trainable models get `Var`s, listed by name.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::{Error, Result};

/// The tensors of one safetensors file (or the shards of one model), memory-mapped and read
/// tensor by tensor, looked up with or without a `transformer.` prefix.
pub struct TensorFile {
    path: PathBuf,
    st: candle_core::safetensors::MmapedSafetensors,
}

impl TensorFile {
    /// Memory-maps a safetensors file.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_shards(path, &[path.to_path_buf()])
    }

    /// Memory-maps the shards of one model; `path` names the model in errors (e.g. its
    /// `model.safetensors.index.json`).
    pub fn load_shards(path: &Path, shards: &[PathBuf]) -> Result<Self> {
        for f in shards {
            if !f.is_file() {
                return Err(Error::invalid(f, "no such file"));
            }
        }
        // SAFETY: the file is only read; like every mmap reader we assume no one truncates it
        // while the model loads (a checkpoint is written under another name and renamed).
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(shards) }
            .map_err(|e| Error::invalid(path, format!("not a readable safetensors file: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            st,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a tensor exists (with or without the `transformer.` prefix).
    pub fn contains(&self, name: &str) -> bool {
        self.key(name).is_some()
    }

    /// The stored name of tensor `name`: itself or with the `transformer.` prefix.
    fn key(&self, name: &str) -> Option<String> {
        [name.to_string(), format!("transformer.{name}")]
            .into_iter()
            .find(|k| self.st.get(k).is_ok())
    }

    /// Tensor `name` as `dtype` on `device`, checked to have `shape` and a float dtype.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let key = self.key(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        let t = self
            .st
            .load(&key, &Device::Cpu)
            .map_err(|e| Error::invalid(&self.path, format!("tensor {name}: {e}")))?;
        if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::DType {
                path: self.path.clone(),
                name: name.into(),
                dtype: t.dtype(),
            });
        }
        if t.dims() != shape {
            return Err(Error::Shape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    /// Shape of tensor `name`, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let view = self.st.get(&self.key(name)?).ok()?;
        Some(view.shape().to_vec())
    }
}

/// How a fresh parameter is initialised when no file provides it.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Zeros,
    Ones,
    Normal(f64),
}

enum Source<'a> {
    File(&'a TensorFile),
    Random(Box<rand::rngs::StdRng>),
}

/// Hands out a model's parameters in construction order, from a file or a seeded init.
/// With `trainable`, every parameter is a `Var`, recorded under its checkpoint name.
pub struct Params<'a> {
    source: Source<'a>,
    device: Device,
    dtype: DType,
    trainable: bool,
    vars: Vec<(String, Var)>,
}

impl<'a> Params<'a> {
    /// Parameters read from `file` (every tensor must be present with the right shape).
    pub fn from_file(file: &'a TensorFile, device: &Device, trainable: bool) -> Self {
        Self {
            source: Source::File(file),
            device: device.clone(),
            dtype: DType::F32,
            trainable,
            vars: Vec::new(),
        }
    }

    /// Fresh parameters from a seeded RNG (same seed, same weights).
    pub fn random(seed: u64, device: &Device, trainable: bool) -> Self {
        Self {
            source: Source::Random(Box::new(rand::rngs::StdRng::seed_from_u64(seed))),
            device: device.clone(),
            dtype: DType::F32,
            trainable,
            vars: Vec::new(),
        }
    }

    /// Whether the parameters are trainable (frozen ones skip weight gradients).
    pub fn trainable(&self) -> bool {
        self.trainable
    }

    /// The device parameters are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Parameter `name` of `shape`.
    pub fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = match &mut self.source {
            Source::File(f) => f.get(name, shape, &self.device, self.dtype)?,
            Source::Random(rng) => {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = match init {
                    Init::Zeros => vec![0.0; n],
                    Init::Ones => vec![1.0; n],
                    Init::Normal(std) => {
                        let normal = rand_distr::Normal::new(0.0, std)
                            .map_err(|e| Error::Config(format!("{name}: init std {std}: {e}")))?;
                        (0..n).map(|_| normal.sample(rng.as_mut()) as f32).collect()
                    }
                };
                Tensor::from_vec(data, shape, &self.device)?.to_dtype(self.dtype)?
            }
        };
        if self.trainable {
            let v = Var::from_tensor(&t)?;
            let t = v.as_tensor().clone();
            self.vars.push((name.to_string(), v));
            Ok(t)
        } else {
            Ok(t)
        }
    }

    /// The trainable variables handed out so far, by name.
    pub fn into_vars(self) -> Vec<(String, Var)> {
        self.vars
    }
}

/// Writes named tensors to a safetensors file atomically, with `format = pt` metadata
/// (which Hugging Face `transformers` requires).
pub fn save_safetensors(
    tensors: &[(String, Tensor)],
    path: &Path,
    extra_meta: &[(&str, String)],
) -> Result<()> {
    Ok(cocomix_ops::save_safetensors(tensors, extra_meta, path)?)
}
