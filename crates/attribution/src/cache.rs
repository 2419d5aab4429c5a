//! The label cache: labels of fixed, aligned windows of the training shard, computed once
//! by the teacher and memory-mapped by the trainer.
//!
//! Window `w` holds tokens `[w·T, w·T + T + 1)` of `train.bin`: the teacher reads the first
//! T (the tokens the student reads), and the labels `[T, K_attr]` are stored at offset
//! `w·T·K_attr` of `labels.bin` (u16 when C ≤ 65536, else u32, little-endian).
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use cocomix_data::TokenShard;
use cocomix_model::CausalLm;
use cocomix_sae::Sae;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::{attribute, labels, Error, LabelMode, Result};

const FORMAT_VERSION: u32 = 1;

/// Everything the cached labels depend on; a cache is used only when all of it matches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelCacheSpec {
    /// How the teacher was named (folder or hub id), for people reading the metadata.
    pub teacher: String,
    /// sha256 of the teacher's weights file.
    pub teacher_sha256: String,
    /// sha256 of the SAE file.
    pub sae_sha256: String,
    /// The teacher layer the SAE reads.
    pub layer: usize,
    /// Labels per token.
    pub k_attr: usize,
    /// Window length T (the training context).
    pub window: usize,
    pub mode: LabelMode,
    /// Number of SAE latents (label range).
    pub n_latents: usize,
    /// Identity of the training shard: the data folder's tokenizer identity and token count.
    pub data: String,
    /// Label only the first this many aligned windows (0: the whole shard). A run of S steps
    /// of B sequences visits at most S·B windows, so small runs need not label everything.
    pub max_windows: usize,
}

/// The choices a label cache is made with (the rest of [`LabelCacheSpec`] identifies files).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LabelChoice {
    /// The teacher layer the SAE reads.
    pub layer: usize,
    /// Labels per token (K_attr).
    pub k_attr: usize,
    /// Window length T (the training context).
    pub window: usize,
    pub mode: LabelMode,
    /// Label only the first this many aligned windows (0: all).
    pub max_windows: usize,
}

impl LabelCacheSpec {
    /// The spec of a cache labelled by a teacher (named `teacher_name`, weights in
    /// `teacher_weights`) through `sae`, over the training shard of the data folder described
    /// by `data`. Hashes the teacher's weights and the SAE's files.
    pub fn new(
        teacher_name: &str,
        teacher_weights: &Path,
        sae: &Sae,
        data: &cocomix_data::DataMeta,
        choice: LabelChoice,
    ) -> Result<Self> {
        let sae_sha256 = match sae.files() {
            [] => {
                return Err(Error::Other(
                    "the SAE was built in memory: no file identifies its label cache".into(),
                ))
            }
            [one] => cocomix_data::file_sha256(one)?,
            // A folder SAE (weights, cfg.json, …): the hash of its files' hashes.
            many => {
                let hashes = many
                    .iter()
                    .map(|f| cocomix_data::file_sha256(f))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                cocomix_data::sha256_hex(hashes.join("\n").as_bytes())
            }
        };
        Ok(Self {
            teacher: teacher_name.to_string(),
            teacher_sha256: cocomix_data::file_sha256(teacher_weights)?,
            sae_sha256,
            layer: choice.layer,
            k_attr: choice.k_attr,
            window: choice.window,
            mode: choice.mode,
            n_latents: sae.n_latents(),
            data: format!("{}:{}", data.tokenizer_identity, data.train_tokens),
            max_windows: choice.max_windows,
        })
    }

    /// A short stable key of the spec, naming its cache folder.
    pub fn key(&self) -> String {
        let json = serde_json::to_string(self).expect("spec serialises");
        cocomix_data::sha256_hex(json.as_bytes())[..12].to_string()
    }

    fn diff(&self, other: &Self) -> Option<String> {
        let a = serde_json::to_value(self).ok()?;
        let b = serde_json::to_value(other).ok()?;
        a.as_object()?
            .iter()
            .find(|(k, v)| b.get(k.as_str()) != Some(v))
            .map(|(k, v)| {
                format!(
                    "{k} is {v} in the cache but {} in this run",
                    b.get(k.as_str()).cloned().unwrap_or_default()
                )
            })
    }
}

/// `meta.json` of a finished cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheMeta {
    pub format_version: u32,
    pub spec: LabelCacheSpec,
    pub n_windows: usize,
    /// Bytes per label (2 or 4).
    pub label_bytes: usize,
}

#[derive(Serialize, Deserialize)]
struct Progress {
    spec: LabelCacheSpec,
    done: usize,
}

/// A finished, memory-mapped label cache.
pub struct LabelCache {
    dir: PathBuf,
    meta: CacheMeta,
    mmap: Mmap,
    resumed_from: Option<usize>,
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Other(e.to_string()))?;
    cocomix_data::write_atomic(path, text.as_bytes())?;
    Ok(())
}

impl LabelCache {
    /// The cache folder of `spec` inside a data folder.
    pub fn path_for(data_dir: &Path, spec: &LabelCacheSpec) -> PathBuf {
        data_dir.join(format!(
            "labels-L{}-T{}-K{}-{}",
            spec.layer,
            spec.window,
            spec.k_attr,
            spec.key()
        ))
    }

    /// Number of aligned windows of length `window` in a shard of `n_tokens`.
    pub fn windows_in(n_tokens: usize, window: usize) -> usize {
        if n_tokens < window + 1 {
            0
        } else {
            (n_tokens - 1) / window
        }
    }

    /// Opens a finished cache, refusing one whose metadata differs from `spec`.
    pub fn open(dir: &Path, spec: &LabelCacheSpec) -> Result<Self> {
        let meta_path = dir.join("meta.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| file_err(&meta_path, e))?;
        let meta: CacheMeta = serde_json::from_str(&text)
            .map_err(|e| file_err(&meta_path, format!("not a label-cache meta.json: {e}")))?;
        if meta.format_version != FORMAT_VERSION {
            return Err(file_err(
                &meta_path,
                format!(
                    "format version {} (expected {FORMAT_VERSION})",
                    meta.format_version
                ),
            ));
        }
        if let Some(d) = meta.spec.diff(spec) {
            return Err(file_err(
                &meta_path,
                format!("label cache does not match this run: {d}"),
            ));
        }
        let bin = dir.join("labels.bin");
        let file = std::fs::File::open(&bin).map_err(|e| file_err(&bin, e))?;
        let want = (meta.n_windows * spec.window * spec.k_attr * meta.label_bytes) as u64;
        let have = file.metadata().map_err(|e| file_err(&bin, e))?.len();
        if have != want {
            return Err(file_err(
                &bin,
                format!("holds {have} bytes, meta.json implies {want}: truncated or foreign"),
            ));
        }
        // SAFETY: read-only; caches are finalised by rename and never modified in place.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| file_err(&bin, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            mmap,
            resumed_from: None,
        })
    }

    /// Windows an interrupted build had already labelled when [`LabelCache::build`]
    /// continued it (`None`: built from window 0, or reused finished).
    pub fn resumed_from(&self) -> Option<usize> {
        self.resumed_from
    }

    /// The metadata.
    pub fn meta(&self) -> &CacheMeta {
        &self.meta
    }

    /// The cache folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of windows.
    pub fn n_windows(&self) -> usize {
        self.meta.n_windows
    }

    /// Labels of window `w`, flattened `[T, K_attr]`.
    pub fn window_labels(&self, w: usize) -> Vec<u32> {
        let n = self.meta.spec.window * self.meta.spec.k_attr;
        let b = self.meta.label_bytes;
        let bytes = &self.mmap[w * n * b..(w + 1) * n * b];
        if b == 2 {
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect()
        } else {
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
    }

    /// Builds (or finishes, after a kill) the cache of `spec` in `dir`, running the teacher
    /// over the aligned windows of `shard`, `batch` windows at a time. Returns the finished
    /// cache; an existing finished cache with the same spec is reused.
    pub fn build(
        teacher: &dyn CausalLm,
        sae: &Sae,
        spec: &LabelCacheSpec,
        shard: &TokenShard,
        dir: &Path,
        batch: usize,
    ) -> Result<Self> {
        if dir.join("meta.json").is_file() {
            let cache = Self::open(dir, spec)?;
            tracing::info!(
                "{}: reusing the label cache ({} windows)",
                dir.display(),
                cache.n_windows()
            );
            return Ok(cache);
        }
        sae.check_input_width(
            teacher.d_model(),
            &format!("teacher {} at layer {}", spec.teacher, spec.layer),
        )?;
        if sae.n_latents() != spec.n_latents {
            return Err(Error::Other(format!(
                "spec says {} latents, the SAE has {}",
                spec.n_latents,
                sae.n_latents()
            )));
        }
        let all = Self::windows_in(shard.len(), spec.window);
        let n_windows = if spec.max_windows == 0 {
            all
        } else {
            all.min(spec.max_windows)
        };
        if n_windows == 0 {
            return Err(file_err(
                shard.path(),
                format!("fewer than {} tokens: no window to label", spec.window + 1),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let label_bytes = if spec.n_latents <= 1 << 16 { 2 } else { 4 };
        let per_window = spec.window * spec.k_attr * label_bytes;
        let partial = dir.join("labels.bin.partial");
        let progress_path = dir.join("progress.json");
        let mut done = match std::fs::read_to_string(&progress_path)
            .ok()
            .and_then(|t| serde_json::from_str::<Progress>(&t).ok())
        {
            Some(p) if p.spec == *spec && partial.is_file() => p.done,
            _ => 0,
        };
        let resumed_from = (done > 0).then_some(done);
        if done > 0 {
            tracing::info!(
                "{}: resuming the label cache at window {done}/{n_windows}",
                dir.display()
            );
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&partial)
            .map_err(|e| file_err(&partial, e))?;
        file.set_len((n_windows * per_window) as u64)
            .map_err(|e| file_err(&partial, e))?;
        let bar = cocomix_data::progress_bar(n_windows as u64, "labels").with_position(done as u64);
        let dev = teacher.device().clone();
        while done < n_windows {
            let nb = batch.max(1).min(n_windows - done);
            let mut ids = Vec::with_capacity(nb * spec.window);
            for w in done..done + nb {
                shard.read_into(w * spec.window, spec.window, &mut ids);
            }
            let ids = Tensor::from_vec(ids, (nb, spec.window), &dev)?;
            let att = attribute(teacher, sae, &ids, spec.layer)?;
            let (lab, _) = labels(&att, spec.n_latents, spec.k_attr, spec.mode)?;
            let lab: Vec<u32> = lab.flatten_all()?.to_vec1()?;
            let bytes: Vec<u8> = if label_bytes == 2 {
                lab.iter().flat_map(|&l| (l as u16).to_le_bytes()).collect()
            } else {
                lab.iter().flat_map(|&l| l.to_le_bytes()).collect()
            };
            file.seek(SeekFrom::Start((done * per_window) as u64))
                .map_err(|e| file_err(&partial, e))?;
            file.write_all(&bytes).map_err(|e| file_err(&partial, e))?;
            file.sync_data().map_err(|e| file_err(&partial, e))?;
            done += nb;
            write_json_atomic(
                &progress_path,
                &Progress {
                    spec: spec.clone(),
                    done,
                },
            )?;
            bar.set_position(done as u64);
        }
        bar.finish_and_clear();
        drop(file);
        let bin = dir.join("labels.bin");
        std::fs::rename(&partial, &bin).map_err(|e| file_err(&bin, e))?;
        write_json_atomic(
            &dir.join("meta.json"),
            &CacheMeta {
                format_version: FORMAT_VERSION,
                spec: spec.clone(),
                n_windows,
                label_bytes,
            },
        )?;
        std::fs::remove_file(&progress_path).ok();
        Ok(Self {
            resumed_from,
            ..Self::open(dir, spec)?
        })
    }
}
