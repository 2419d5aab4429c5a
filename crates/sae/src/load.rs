//! Reading and writing SAE files.
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, PthTensors, Stack};
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result, Sae};

const TENSORS: [&str; 4] = [
    "pre_bias",
    "encoder.weight",
    "latent_bias",
    "decoder.weight",
];

/// Turns a spec into a local file: a path, an `https://` URL (downloaded once into the
/// cache folder), or `hf://owner/repo/path/in/repo` (through hf-hub).
pub(crate) fn resolve(spec: &str) -> Result<PathBuf> {
    if let Some(rest) = spec.strip_prefix("hf://") {
        let mut parts = rest.splitn(3, '/');
        let (Some(owner), Some(name), Some(file)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(Error::Other(format!(
                "{spec}: expected hf://owner/repo/path/to/file"
            )));
        };
        let api = hf_hub::api::sync::Api::new().map_err(|e| offline(spec, e))?;
        return api
            .model(format!("{owner}/{name}"))
            .get(file)
            .map_err(|e| offline(spec, e));
    }
    if spec.starts_with("https://") || spec.starts_with("http://") {
        return download(spec);
    }
    let path = PathBuf::from(spec);
    if !path.is_file() {
        return Err(Error::file(path, "no such file"));
    }
    Ok(path)
}

fn offline(spec: &str, e: impl std::fmt::Display) -> Error {
    Error::Other(format!(
        "could not download the SAE {spec} ({e}); offline, fetch the file elsewhere and pass its path"
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

/// Loads a `.pt` (zip) or safetensors file, telling them apart by their first bytes.
pub(crate) fn load_file(path: &Path) -> Result<Sae> {
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    if &head == b"PK\x03\x04" {
        load_pt(path)
    } else {
        load_safetensors(path)
    }
}

fn float(path: &Path, name: &str, t: Tensor) -> Result<Tensor> {
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
            "no `activation` entry: not an OpenAI TopK SAE file",
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

fn load_safetensors(path: &Path) -> Result<Sae> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e.to_string()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        Error::file(
            path,
            format!("neither a torch.save zip nor safetensors: {e}"),
        )
    })?;
    let md = meta.metadata().clone().unwrap_or_default();
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
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| Error::file(path, e.to_string()))?;
    build(path, tensors, k)
}

pub(crate) fn save_safetensors(
    sae: &Sae,
    path: &Path,
    extra_meta: &[(&str, String)],
) -> Result<()> {
    let mut meta = extra_meta.to_vec();
    meta.push(("k", sae.k.to_string()));
    meta.push(("activation", "TopK".into()));
    let tensors = [&sae.pre_bias, &sae.encoder, &sae.latent_bias, &sae.decoder];
    let named: Vec<(String, Tensor)> = TENSORS
        .iter()
        .zip(tensors)
        .map(|(n, t)| Ok((n.to_string(), t.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    cocomix_ops::save_safetensors(&named, &meta, path).map_err(|e| Error::file(path, e.to_string()))
}
