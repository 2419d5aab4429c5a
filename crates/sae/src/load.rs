//! Finding and reading SAE files: OpenAI's `.pt` and safetensors files here, SAE folders
//! (SAELens, sparsify) through their modules; `hf://` and `https://` specs resolved to
//! local files first.
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, PthTensors, Stack};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};

use crate::sae::{Activation, InputNorm};
use crate::{saelens, sparsify, Error, Result, Sae};

/// OpenAI's tensor names, in [`Sae::new`]'s argument order.
const TENSORS: [&str; 4] = [
    "pre_bias",
    "encoder.weight",
    "latent_bias",
    "decoder.weight",
];

/// The config file of an SAE folder (SAELens and sparsify alike).
pub(crate) const CFG: &str = "cfg.json";

/// A local SAE: one file, or the files of an SAE folder.
pub(crate) enum Resolved {
    File(PathBuf),
    Folder(FolderFiles),
}

/// The files of an SAE folder (all local; from the hub they sit in hf-hub's cache).
pub(crate) struct FolderFiles {
    pub cfg: CfgJson,
    pub format: Format,
    pub weights: PathBuf,
    /// SAELens' `activation_scaler.json`, when present.
    pub scaler: Option<PathBuf>,
}

/// Which library's folder layout, told apart by `cfg.json`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Format {
    SaeLens,
    Sparsify,
}

impl Format {
    fn of(cfg: &CfgJson) -> Result<Self> {
        if cfg.get("d_sae").is_some() {
            Ok(Format::SaeLens)
        } else if cfg.get("num_latents").is_some() || cfg.get("expansion_factor").is_some() {
            Ok(Format::Sparsify)
        } else {
            Err(cfg.err(
                "neither a SAELens config (no `d_sae`) nor a sparsify config (no `num_latents` or `expansion_factor`)",
            ))
        }
    }

    fn weights_file(self) -> &'static str {
        match self {
            Format::SaeLens => saelens::WEIGHTS,
            Format::Sparsify => sparsify::WEIGHTS,
        }
    }
}

/// A parsed `cfg.json`; its accessors name the file and the key in errors.
pub(crate) struct CfgJson {
    pub path: PathBuf,
    map: serde_json::Map<String, serde_json::Value>,
}

impl CfgJson {
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        match serde_json::from_str(&text) {
            Ok(serde_json::Value::Object(map)) => Ok(Self {
                path: path.to_path_buf(),
                map,
            }),
            Ok(_) => Err(Error::file(path, "not a JSON object")),
            Err(e) => Err(Error::file(path, format!("not valid JSON: {e}"))),
        }
    }

    /// The error `msg` about this file.
    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::file(&self.path, msg)
    }

    /// The value of `key`; `null` counts as absent.
    pub fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn typed<T>(
        &self,
        key: &str,
        what: &str,
        f: impl Fn(&serde_json::Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => f(v)
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` = {v} is not {what}"))),
        }
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.typed(key, "a non-negative integer", |v| {
            v.as_u64().and_then(|n| usize::try_from(n).ok())
        })
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("key `{key}` is missing")))
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "true or false", |v| v.as_bool())
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` = {v} is not a string"))),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", |v| v.as_f64())
    }
}

/// The tensors of a safetensors file, taken out one by one with shape checks; whatever is
/// left at the end is refused, as the libraries' strict loading does.
pub(crate) struct Weights {
    path: PathBuf,
    /// What the expected shapes come from, for error messages.
    context: String,
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    pub fn read(path: &Path, context: String) -> Result<Self> {
        let (_, tensors) = read_safetensors(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            context,
            tensors,
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes tensor `name` (as f32), which must have shape `shape`.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::file(&self.path, format!("tensor `{name}` is missing")))?;
        if t.dims() != shape {
            return Err(Error::file(
                &self.path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?} ({})",
                    t.dims(),
                    self.context
                ),
            ));
        }
        float(&self.path, name, t)
    }

    /// Errors naming the first tensor not taken.
    pub fn finish(self, what: &str) -> Result<()> {
        let mut left: Vec<&String> = self.tensors.keys().collect();
        left.sort();
        match left.first() {
            None => Ok(()),
            Some(name) => Err(Error::file(
                &self.path,
                format!("tensor `{name}` is not part of {what}; not supported"),
            )),
        }
    }
}

/// Metadata and tensors (on the CPU) of a safetensors file, read through a memory map.
fn read_safetensors(path: &Path) -> Result<(HashMap<String, String>, HashMap<String, Tensor>)> {
    let file =
        std::fs::File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    // SAFETY: the map is only read, and dropped before returning (the tensors are copies).
    // As with every mmap, a process truncating the file meanwhile could fault the read.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| Error::file(path, format!("cannot map: {e}")))?;
    let bad = |e: &dyn std::fmt::Display| Error::file(path, format!("not a safetensors file: {e}"));
    let (_, header) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| bad(&e))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| bad(&e))?;
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = view
                .load(&Device::Cpu)
                .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
            Ok((name, t))
        })
        .collect::<Result<_>>()?;
    Ok((meta, tensors))
}

/// Turns a spec into local files: a path (file or SAE folder), an `https://` URL of a file
/// (downloaded once into the cache folder), or `hf://owner/repo[/path]` through hf-hub.
pub(crate) fn resolve(spec: &str) -> Result<Resolved> {
    if let Some(rest) = spec.strip_prefix("hf://") {
        return resolve_hub(spec, rest);
    }
    if spec.starts_with("https://") || spec.starts_with("http://") {
        return download(spec).map(Resolved::File);
    }
    local(Path::new(spec))
}

/// A local path: a folder, a file inside an SAE folder (its folder), or an SAE file.
pub(crate) fn local(path: &Path) -> Result<Resolved> {
    if path.is_dir() {
        return local_folder(path).map(Resolved::Folder);
    }
    if !path.is_file() {
        return Err(Error::file(path, "no such file or folder"));
    }
    if let Some(dir) = path
        .parent()
        .filter(|d| in_sae_folder(path) && d.join(CFG).is_file())
    {
        return local_folder(dir).map(Resolved::Folder);
    }
    Ok(Resolved::File(path.to_path_buf()))
}

/// `cfg.json` or a folder format's weights file.
fn in_sae_folder(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == CFG || n == saelens::WEIGHTS || n == sparsify::WEIGHTS)
}

fn local_folder(dir: &Path) -> Result<FolderFiles> {
    let cfg_path = dir.join(CFG);
    if !cfg_path.is_file() {
        let mut hookpoints: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().join(CFG).is_file())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        hookpoints.sort();
        let hint = match hookpoints.as_slice() {
            [] => String::new(),
            some => format!(
                "; its subfolders {} are SAE folders: pick one",
                some.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            ),
        };
        return Err(Error::file(
            dir,
            format!("no {CFG}: not an SAE folder (SAELens or sparsify){hint}"),
        ));
    }
    let cfg = CfgJson::read(&cfg_path)?;
    let format = Format::of(&cfg)?;
    let weights = dir.join(format.weights_file());
    if !weights.is_file() {
        return Err(Error::file(
            &weights,
            format!("missing (the weights of a {format:?} folder, by its {CFG})"),
        ));
    }
    let scaler = Some(dir.join(saelens::SCALER)).filter(|p| p.is_file());
    Ok(FolderFiles {
        cfg,
        format,
        weights,
        scaler,
    })
}

/// `hf://owner/repo[/path]`: a file when `path` ends in `.pt`/`.pth`/`.safetensors` (other
/// than a folder format's weights file), else an SAE folder (`cfg.json`, then the weights
/// file its format names).
fn resolve_hub(spec: &str, rest: &str) -> Result<Resolved> {
    let mut parts = rest.splitn(3, '/');
    let (owner, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if owner.is_empty() || name.is_empty() {
        return Err(Error::Other(format!(
            "{spec}: expected hf://owner/repo/path (a file, or an SAE folder of the repository)"
        )));
    }
    let path = parts.next().unwrap_or("").trim_matches('/');
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .build()
        .map_err(|e| offline(spec, e))?;
    let repo = api.model(format!("{owner}/{name}"));
    let is_file = [".pt", ".pth", ".safetensors"]
        .iter()
        .any(|ext| path.ends_with(ext));
    if is_file && !in_sae_folder(Path::new(path)) {
        return repo
            .get(path)
            .map(Resolved::File)
            .map_err(|e| offline(spec, e));
    }
    let folder = if in_sae_folder(Path::new(path)) {
        path.rsplit_once('/').map_or("", |(dir, _)| dir)
    } else {
        path
    };
    let in_folder = |file: &str| {
        if folder.is_empty() {
            file.to_string()
        } else {
            format!("{folder}/{file}")
        }
    };
    let cfg = CfgJson::read(&repo.get(&in_folder(CFG)).map_err(|e| offline(spec, e))?)?;
    let format = Format::of(&cfg)?;
    let weights = repo
        .get(&in_folder(format.weights_file()))
        .map_err(|e| offline(spec, e))?;
    // Only SAELens training checkpoints have one; when it is needed and absent, the loader
    // says what is missing.
    let scaler = if format == Format::SaeLens && saelens::needs_scaler(&cfg) {
        repo.get(&in_folder(saelens::SCALER)).ok()
    } else {
        None
    };
    Ok(Resolved::Folder(FolderFiles {
        cfg,
        format,
        weights,
        scaler,
    }))
}

fn offline(spec: &str, e: impl std::fmt::Display) -> Error {
    Error::Other(format!(
        "could not download the SAE {spec} ({e}); offline, fetch the file (or the SAE folder: cfg.json and its weights) elsewhere and pass its local path"
    ))
}

fn cache_dir() -> PathBuf {
    std::env::var_os("COCOMIX_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/cocomix")))
        .unwrap_or_else(|| std::env::temp_dir().join("cocomix-cache"))
        .join("sae")
}

fn download(url: &str) -> Result<PathBuf> {
    use sha2::Digest;
    let key: String = sha2::Sha256::digest(url.as_bytes())
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();
    let ext = if url.ends_with(".safetensors") {
        "safetensors"
    } else {
        "pt"
    };
    let dir = cache_dir();
    let path = dir.join(format!("{key}.{ext}"));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, e.to_string()))?;
    tracing::info!("downloading {url}");
    let resp = ureq::get(url).call().map_err(|e| offline(url, e))?;
    let mut bytes = Vec::new();
    resp.into_reader()
        .read_to_end(&mut bytes)
        .map_err(|e| offline(url, e))?;
    cocomix_ops::write_atomic(&path, &bytes)?;
    Ok(path)
}

/// Loads what [`resolve`] found (on the CPU).
pub(crate) fn load_resolved(resolved: &Resolved) -> Result<Sae> {
    match resolved {
        Resolved::File(path) => Ok(load_file(path)?.with_files(vec![path.clone()])),
        Resolved::Folder(files) => {
            let sae = match files.format {
                Format::SaeLens => saelens::load(files)?,
                Format::Sparsify => sparsify::load(files)?,
            };
            let mut list = vec![files.weights.clone(), files.cfg.path.clone()];
            list.extend(files.scaler.clone());
            Ok(sae.with_files(list))
        }
    }
}

/// Loads a `.pt` (zip) or safetensors file, telling them apart by their first bytes.
fn load_file(path: &Path) -> Result<Sae> {
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    if &head == b"PK\x03\x04" {
        load_pt(path)
    } else {
        load_openai_safetensors(path)
    }
}

/// `t` as f32, refusing non-float tensors by name.
pub(crate) fn float(path: &Path, name: &str, t: Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => Ok(t.to_dtype(DType::F32)?),
        other => Err(Error::file(
            path,
            format!("tensor `{name}` has dtype {other:?}; expected f32, f16 or bf16"),
        )),
    }
}

fn build(path: &Path, mut tensors: HashMap<String, Tensor>, k: usize) -> Result<Sae> {
    let mut take = |name: &str| -> Result<Tensor> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| Error::file(path, format!("tensor `{name}` is missing")))?;
        float(path, name, t)
    };
    let (p, e, l, d) = (
        take(TENSORS[0])?,
        take(TENSORS[1])?,
        take(TENSORS[2])?,
        take(TENSORS[3])?,
    );
    Sae::new(p, e, l, d, k, path.to_path_buf())
}

fn check_activation(path: &Path, activation: Option<&str>) -> Result<()> {
    match activation {
        Some("TopK") => Ok(()),
        Some(other) => Err(Error::file(
            path,
            format!("activation {other:?} is not supported (only TopK SAEs)"),
        )),
        None => Err(Error::file(
            path,
            "no `activation` entry: not an OpenAI TopK SAE file (SAELens and sparsify SAEs are folders with a cfg.json)",
        )),
    }
}

/// OpenAI's `torch.save` dict: four tensors, three unused buffers, `activation` = "TopK"
/// and `activation_state_dict` = {k, postact_fn = "ReLU"}.
fn load_pt(path: &Path) -> Result<Sae> {
    let bad = |e: &dyn std::fmt::Display| {
        Error::file(path, format!("not a readable torch.save file: {e}"))
    };
    let file = std::fs::File::open(path).map_err(|e| bad(&e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| bad(&e))?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| Error::file(path, "no data.pkl inside: not a torch.save file"))?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::BufReader::new(
            zip.by_name(&pkl).map_err(|e| bad(&e))?,
        ))
        .map_err(|e| bad(&e))?;
    let Object::Dict(entries) = stack.finalize().map_err(|e| bad(&e))? else {
        return Err(Error::file(path, "the pickle does not hold a dict"));
    };
    let mut activation = None;
    let mut k = None;
    let mut postact = None;
    for (key, value) in entries {
        match (key, value) {
            (Object::Unicode(key), Object::Unicode(v)) if key == "activation" => {
                activation = Some(v)
            }
            (Object::Unicode(key), Object::Dict(d)) if key == "activation_state_dict" => {
                for (kk, vv) in d {
                    match (kk, vv) {
                        (Object::Unicode(n), Object::Int(v)) if n == "k" => k = Some(v as i64),
                        (Object::Unicode(n), Object::Long(v)) if n == "k" => k = Some(v),
                        (Object::Unicode(n), Object::Unicode(v)) if n == "postact_fn" => {
                            postact = Some(v)
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    check_activation(path, activation.as_deref())?;
    if let Some(p) = postact.as_deref().filter(|p| *p != "ReLU") {
        return Err(Error::file(
            path,
            format!("postact_fn {p:?} is not supported (ReLU)"),
        ));
    }
    let k = k.ok_or_else(|| Error::file(path, "activation_state_dict has no integer `k`"))?;
    let k = usize::try_from(k).map_err(|_| Error::file(path, format!("k = {k} is negative")))?;
    let pth = PthTensors::new(path, None).map_err(|e| bad(&e))?;
    let mut tensors = HashMap::new();
    for name in TENSORS {
        if let Some(t) = pth.get(name).map_err(|e| bad(&e))? {
            tensors.insert(name.to_string(), t);
        }
    }
    build(path, tensors, k)
}

fn load_openai_safetensors(path: &Path) -> Result<Sae> {
    let (md, tensors) = read_safetensors(path).map_err(|e| match e {
        Error::File { reason, .. } => Error::file(
            path,
            format!("neither a torch.save zip nor safetensors: {reason}"),
        ),
        e => e,
    })?;
    check_activation(path, md.get("activation").map(|s| s.as_str()))?;
    let k: usize = md
        .get("k")
        .ok_or_else(|| Error::file(path, "safetensors metadata has no `k`"))?
        .parse()
        .map_err(|_| {
            Error::file(
                path,
                format!("metadata k = {:?} is not an integer", md["k"]),
            )
        })?;
    build(path, tensors, k)
}

/// Saves an SAE with OpenAI's rule in OpenAI's tensor names and layout.
pub(crate) fn save_safetensors(
    sae: &Sae,
    path: &Path,
    extra_meta: &[(&str, String)],
) -> Result<()> {
    let p = sae.parts();
    let k = match p.activation {
        Activation::TopK { k } if p.input_norm == InputNorm::LayerNorm && p.b_dec_on_input => k,
        _ => {
            return Err(Error::file(
                sae.source(),
                format!(
                    "only OpenAI-rule SAEs (TopK, LayerNorm inputs, b_dec subtracted) are saved; this one is {} on {}: keep its original files",
                    p.activation, p.input_norm
                ),
            ))
        }
    };
    let mut meta = extra_meta.to_vec();
    meta.push(("k", k.to_string()));
    meta.push(("activation", "TopK".into()));
    let tensors = [&p.b_dec, &p.w_enc, &p.b_enc, &p.w_dec.t()?];
    let named: Vec<(String, Tensor)> = TENSORS
        .iter()
        .zip(tensors)
        .map(|(n, t)| Ok((n.to_string(), t.to_dtype(DType::F32)?.contiguous()?)))
        .collect::<Result<_>>()?;
    cocomix_ops::save_safetensors(&named, &meta, path).map_err(|e| Error::file(path, e.to_string()))
}
