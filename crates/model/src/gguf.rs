//! GGUF files (llama.cpp's format) read through Candle's GGUF reader: checked metadata and
//! tensor tables, tensors dequantized to f32, and Llama models built from them.
//!
//! llama.cpp's `convert_hf_to_gguf.py` permutes the rows of each head of `q_proj` and
//! `k_proj` so that rotary pairs sit next to each other (llama.cpp's rope); loading undoes
//! that permutation, so a GGUF model computes exactly what the Hugging Face one does.
//!
//! ```no_run
//! use cocomix_model::gguf::GgufFile;
//! let mut f = GgufFile::open("model.gguf".as_ref())?;
//! println!("{} tensors, architecture {}", f.tensor_names().len(), f.architecture()?);
//! let w = f.dequantize("blk.0.attn_q.weight")?; // f32, [out, in]
//! # Ok::<(), cocomix_model::Error>(())
//! ```
use std::collections::{BTreeSet, HashMap};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use crate::llama::{Llama, LlamaConfig, Rope, RopeScaling, Weights};
use crate::params::Init;
use crate::{Error, Result};

/// Tensor types this crate dequantizes (each checked against llama.cpp's gguf-py).
pub const SUPPORTED_TYPES: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// Architectures (`general.architecture`) this crate builds models for.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// llama.cpp's name of a tensor type id (`ggml_type`), for types Candle may not know.
pub fn type_name_of_id(id: u32) -> Option<&'static str> {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(id as usize).copied()
}

/// llama.cpp's name of a tensor type.
pub fn type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

fn supported_list() -> String {
    SUPPORTED_TYPES
        .iter()
        .map(|t| type_name(*t))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a path names a GGUF file (by its extension).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// An open GGUF file: its metadata and tensor table, read and checked (every tensor of a
/// supported type and inside the file); tensors are read on demand.
pub struct GgufFile {
    path: PathBuf,
    reader: BufReader<std::fs::File>,
    content: Content,
}

impl GgufFile {
    /// Reads the header. Refuses, naming the file (and the tensor), an unreadable header, a
    /// tensor type outside [`SUPPORTED_TYPES`] and a file too short for its tensors.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            // Candle appends a backtrace to the message when RUST_BACKTRACE is set.
            let msg = e.to_string();
            let msg = msg.lines().next().unwrap_or_default();
            let unknown = msg
                .strip_prefix("unknown dtype for tensor ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|id| id.parse::<u32>().ok());
            match unknown {
                Some(id) => Error::invalid(
                    path,
                    format!(
                        "tensor type {} (ggml type {id}) is not supported; supported: {}",
                        type_name_of_id(id).unwrap_or("unknown"),
                        supported_list()
                    ),
                ),
                None => Error::invalid(path, format!("not a readable GGUF file: {msg}")),
            }
        })?;
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let info = &content.tensor_infos[name];
            let t = info.ggml_dtype;
            if !SUPPORTED_TYPES.contains(&t) {
                return Err(Error::invalid(
                    path,
                    format!(
                        "tensor `{name}` has type {}, which is not supported; supported: {}",
                        type_name(t),
                        supported_list()
                    ),
                ));
            }
            let elems = info.shape.elem_count();
            if !elems.is_multiple_of(t.block_size()) {
                return Err(Error::invalid(
                    path,
                    format!(
                        "tensor `{name}` has {elems} elements, not a multiple of {}'s block of {}",
                        type_name(t),
                        t.block_size()
                    ),
                ));
            }
            let bytes = (elems / t.block_size() * t.type_size()) as u64;
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > len {
                return Err(Error::invalid(
                    path,
                    format!(
                        "truncated: tensor `{name}` ends at byte {end}, the file has {len} bytes"
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            content,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every metadata entry.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.string("general.architecture")?.ok_or_else(|| {
            Error::invalid(&self.path, "metadata key `general.architecture` is missing")
        })
    }

    /// Tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether the file has tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Type and shape (row-major, `[rows, columns]` for a matrix) of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<(GgmlDType, Vec<usize>)> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| (i.ggml_dtype, i.shape.dims().to_vec()))
    }

    /// Tensor `name` dequantized to f32 on the CPU, row-major.
    pub fn dequantize(&mut self, name: &str) -> Result<Tensor> {
        if !self.has(name) {
            return Err(Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            });
        }
        let err =
            |e: candle_core::Error| Error::invalid(&self.path, format!("tensor `{name}`: {e}"));
        let q = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(err)?;
        q.dequantize(&Device::Cpu).map_err(err)
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad_value(key, v, "a string")),
        }
    }

    fn bad_value(&self, key: &str, v: &Value, want: &str) -> Error {
        Error::invalid(
            &self.path,
            format!(
                "metadata key `{key}` is {:?}, expected {want}",
                v.value_type()
            ),
        )
    }

    /// An integer metadata value (any integer type), if present.
    pub fn usize_value(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.content.metadata.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.bad_value(key, v, "a non-negative integer"))
    }

    /// A float metadata value (f32 or f64), if present.
    pub fn f64_value(&self, key: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.bad_value(key, v, "a float")),
        }
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.usize_value(key)?
            .ok_or_else(|| Error::invalid(&self.path, format!("metadata key `{key}` is missing")))
    }

    /// The Hugging Face config this file's `llama.*` metadata describes, and llama.cpp's
    /// rope frequency factors (`rope_freqs.weight`, Llama 3 scaling) when present.
    pub fn llama_config(&mut self) -> Result<(LlamaConfig, Option<Vec<f32>>)> {
        let arch = self.architecture()?.to_string();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(Error::invalid(
                &self.path,
                format!(
                    "architecture `{arch}` is not supported (supported: {})",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ),
            ));
        }
        let key = |k: &str| format!("{arch}.{k}");
        if let Some(n) = self.usize_value(&key("expert_count"))?.filter(|&n| n > 0) {
            return Err(Error::invalid(
                &self.path,
                format!("a mixture of {n} experts is not supported (dense Llama models only)"),
            ));
        }
        let hidden = self.required(&key("embedding_length"))?;
        let heads = self.required(&key("attention.head_count"))?;
        let kv_heads = self
            .usize_value(&key("attention.head_count_kv"))?
            .unwrap_or(heads);
        let head_dim = match self.usize_value(&key("attention.key_length"))? {
            Some(k) => k,
            None => hidden / heads.max(1),
        };
        if let Some(v) = self.usize_value(&key("attention.value_length"))? {
            if v != head_dim {
                return Err(Error::invalid(
                    &self.path,
                    format!(
                        "value heads of {v} channels and key heads of {head_dim} are not supported"
                    ),
                ));
            }
        }
        if let Some(r) = self.usize_value(&key("rope.dimension_count"))? {
            if r != head_dim {
                return Err(Error::invalid(
                    &self.path,
                    format!("rope over {r} of {head_dim} head channels (partial rotary) is not supported"),
                ));
            }
        }
        let vocab = self
            .tensor_info("token_embd.weight")
            .and_then(|(_, s)| s.first().copied())
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: "token_embd.weight".into(),
            })?;
        if let Some(v) = self.usize_value(&key("vocab_size"))? {
            if v != vocab {
                return Err(Error::invalid(
                    &self.path,
                    format!("`{arch}.vocab_size` is {v} but token_embd.weight has {vocab} rows"),
                ));
            }
        }
        let scaling = self.string(&key("rope.scaling.type"))?.map(str::to_string);
        let legacy_linear = self.f64_value(&key("rope.scale_linear"))?;
        let rope_scaling = match (scaling.as_deref(), legacy_linear) {
            (None | Some("none"), None) => None,
            (None | Some("none"), Some(1.0)) => None,
            (None, Some(f)) | (Some("linear"), Some(f)) => Some(f),
            (Some("linear"), None) => Some(
                self.f64_value(&key("rope.scaling.factor"))?.ok_or_else(|| {
                    Error::invalid(
                        &self.path,
                        format!("linear rope scaling without `{arch}.rope.scaling.factor`"),
                    )
                })?,
            ),
            (Some(other), _) => {
                return Err(Error::invalid(
                    &self.path,
                    format!("rope scaling `{other}` is not supported (supported: none, linear, and llama3 through rope_freqs)"),
                ))
            }
        }
        .map(|factor| RopeScaling {
            rope_type: Some("linear".into()),
            factor: Some(factor),
            ..Default::default()
        });
        let cfg = LlamaConfig {
            model_type: Some("llama".into()),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.required(&key("feed_forward_length"))?,
            num_hidden_layers: self.required(&key("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim: Some(head_dim),
            max_position_embeddings: self.required(&key("context_length"))?,
            rms_norm_eps: self
                .f64_value(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: Some(self.f64_value(&key("rope.freq_base"))?.unwrap_or(10_000.0)),
            rope_scaling,
            rope_parameters: None,
            tie_word_embeddings: !self.has("output.weight"),
            attention_bias: self.has("blk.0.attn_q.bias"),
            mlp_bias: self.has("blk.0.ffn_gate.bias"),
            hidden_act: "silu".into(),
            sliding_window: None,
        };
        cfg.validate()
            .map_err(|e| Error::invalid(&self.path, e.to_string()))?;
        let factors = if self.has("rope_freqs.weight") {
            Some(
                self.dequantize("rope_freqs.weight")?
                    .flatten_all()?
                    .to_vec1()?,
            )
        } else {
            None
        };
        Ok((cfg, factors))
    }
}

/// The GGUF name of a Hugging Face Llama tensor name (llama.cpp's tensor map).
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    let top = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{i}.{g}.{kind}"))
}

/// Undoes llama.cpp's q/k permutation: within each of `n_head` heads, rows stored as
/// interleaved pairs `(x₀, y₀, x₁, y₁, …)` go back to `(x₀, x₁, …, y₀, y₁, …)`.
fn unpermute(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / n_head / 2;
    Ok(t.reshape((n_head, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Hands out a GGUF's tensors by Hugging Face name, dequantized and un-permuted.
struct GgufWeights<'a> {
    file: &'a mut GgufFile,
    n_head: usize,
    n_kv_head: usize,
    device: Device,
    dtype: DType,
    used: BTreeSet<String>,
}

impl Weights for GgufWeights<'_> {
    fn get(&mut self, name: &str, shape: &[usize], _init: Init, matrix: bool) -> Result<Tensor> {
        let g = gguf_tensor_name(name)
            .ok_or_else(|| Error::Other(format!("no GGUF name for tensor {name}")))?;
        let t = self.file.dequantize(&g)?;
        if t.dims() != shape {
            return Err(Error::Shape {
                path: self.file.path.clone(),
                name: g,
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        let t = if g.contains(".attn_q.") {
            unpermute(&t, self.n_head)?
        } else if g.contains(".attn_k.") {
            unpermute(&t, self.n_kv_head)?
        } else {
            t
        };
        self.used.insert(g);
        let dtype = if matrix { self.dtype } else { DType::F32 };
        Ok(t.to_dtype(dtype)?.to_device(&self.device)?)
    }
}

/// Loads a frozen Llama from a GGUF file, dequantizing every tensor once to `dtype`
/// (matrices) or f32 (norms). Refuses a tensor the model does not use, naming it.
pub fn load_llama(path: &Path, device: &Device, dtype: DType) -> Result<Llama> {
    let mut file = GgufFile::open(path)?;
    let (cfg, factors) = file.llama_config()?;
    let mut rope = Rope::new(&cfg).map_err(|e| Error::invalid(path, e.to_string()))?;
    if let Some(f) = factors {
        rope = rope
            .with_freq_factors(&f)
            .map_err(|e| Error::invalid(path, format!("rope_freqs.weight: {e}")))?;
    }
    let mut w = GgufWeights {
        file: &mut file,
        n_head: cfg.num_attention_heads,
        n_kv_head: cfg.n_kv_heads(),
        device: device.clone(),
        dtype,
        used: BTreeSet::new(),
    };
    let model = Llama::from_weights(&cfg, rope, &mut w)?;
    let used = std::mem::take(&mut w.used);
    let unused: Vec<&str> = file
        .tensor_names()
        .into_iter()
        .filter(|n| !used.contains(*n) && *n != "rope_freqs.weight")
        .collect();
    if !unused.is_empty() {
        return Err(Error::invalid(
            path,
            format!(
                "tensors a Llama model does not have (an unsupported variant?): {}",
                unused.join(", ")
            ),
        ));
    }
    Ok(model)
}
