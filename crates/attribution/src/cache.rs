//! The label cache: labels of fixed, aligned windows of the training shard, computed once
//! by the teacher and memory-mapped by the trainer.
//!
//! Window `w` holds tokens `[w·T, w·T + T + 1)` of `train.bin`: the teacher reads the first
//! T (the tokens the student reads), and the labels `[T, K_attr]` are stored at offset
//! `w·T·K_attr` of `labels.bin` (u16 when C ≤ 65536, else u32, little-endian).
//!
//! Under data parallelism ([`LabelCache::build_dist`]) the windows still to label are split
//! into one contiguous share per rank; each rank writes its labels at their offsets of the
//! one shared `labels.bin.partial` and records its finished windows in its own
//! `progress-rank<r>.json`; rank 0 merges them into `progress.json` when a build starts or
//! continues (with any world size) and finishes the cache.
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use cocomix_data::TokenShard;
use cocomix_dist::Comm;
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

/// Windows labelled so far: `0..done` and the half-open `intervals`.
#[derive(Serialize, Deserialize)]
struct Progress {
    spec: LabelCacheSpec,
    #[serde(default)]
    done: usize,
    #[serde(default)]
    intervals: Vec<(usize, usize)>,
}

/// Sorted, disjoint, non-adjacent intervals covering the union of `iv`.
fn merge(mut iv: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    iv.retain(|&(a, b)| a < b);
    iv.sort();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(iv.len());
    for (a, b) in iv {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The windows of `0..n` outside the merged `done` intervals, as intervals in order.
fn missing(done: &[(usize, usize)], n: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    for &(a, b) in done {
        if a > at {
            out.push((at, a.min(n)));
        }
        at = at.max(b);
    }
    if at < n {
        out.push((at, n));
    }
    out.retain(|&(a, b)| a < b);
    out
}

/// Items `range` (counted over the concatenation of `iv`) as intervals.
fn take(iv: &[(usize, usize)], range: std::ops::Range<usize>) -> Vec<(usize, usize)> {
    let (mut out, mut pos) = (Vec::new(), 0);
    for &(a, b) in iv {
        let (lo, hi) = (range.start.max(pos), range.end.min(pos + b - a));
        if lo < hi {
            out.push((a + lo - pos, a + hi - pos));
        }
        pos += b - a;
    }
    out
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
        Self::build_dist(teacher, sae, spec, shard, dir, batch, &Comm::single())
    }

    /// [`LabelCache::build`] by all ranks of `comm` together, each labelling its share of
    /// the windows still to do (`dir` must be on a filesystem every rank shares). Every
    /// rank returns the finished cache.
    pub fn build_dist(
        teacher: &dyn CausalLm,
        sae: &Sae,
        spec: &LabelCacheSpec,
        shard: &TokenShard,
        dir: &Path,
        batch: usize,
        comm: &Comm,
    ) -> Result<Self> {
        // Rank 0 decides whether the cache is finished, so all ranks take the same path.
        let mut finished = [(comm.is_root() && dir.join("meta.json").is_file()) as u8];
        comm.broadcast(&mut finished, 0)?;
        if finished[0] == 1 {
            let cache = comm.agree(Self::open(dir, spec))?;
            if comm.is_root() {
                tracing::info!(
                    "{}: reusing the label cache ({} windows)",
                    dir.display(),
                    cache.n_windows()
                );
            }
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
        let label_bytes = if spec.n_latents <= 1 << 16 { 2 } else { 4 };
        let per_window = spec.window * spec.k_attr * label_bytes;
        let partial = dir.join("labels.bin.partial");
        // Rank 0 sizes the partial file and merges every earlier process's progress; the
        // other ranks learn the windows done from it.
        let done = if comm.is_root() {
            Self::start_build(spec, dir, &partial, (n_windows * per_window) as u64)
        } else {
            Ok(Vec::new())
        };
        let done = comm.agree(done)?;
        let done_json = serde_json::to_vec(&done).map_err(|e| Error::Other(e.to_string()))?;
        let done: Vec<(usize, usize)> =
            serde_json::from_slice(&comm.broadcast_bytes(&done_json, 0)?)
                .map_err(|e| Error::Other(e.to_string()))?;
        let n_done: usize = done.iter().map(|(a, b)| b - a).sum();
        let resumed_from = (n_done > 0).then_some(n_done);
        if n_done > 0 && comm.is_root() {
            tracing::info!(
                "{}: resuming the label cache with {n_done}/{n_windows} windows done",
                dir.display()
            );
        }
        let todo = missing(&done, n_windows);
        let n_todo: usize = todo.iter().map(|(a, b)| b - a).sum();
        let mine = take(&todo, comm.share(n_todo));
        let labelled = comm.agree(Self::label_windows(
            teacher,
            sae,
            spec,
            shard,
            dir,
            &partial,
            &mine,
            batch,
            (comm.rank(), comm.world()),
        ))?;
        debug_assert_eq!(labelled, mine.iter().map(|(a, b)| b - a).sum::<usize>());
        // Ranks finish their shares at different times; the last one releases the others.
        comm.wait_for_all()?;
        if comm.is_root() {
            let finish = || -> Result<()> {
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
                for f in progress_files(dir) {
                    std::fs::remove_file(f).ok();
                }
                Ok(())
            };
            comm.agree(finish())?;
        } else {
            comm.agree(Ok::<(), Error>(()))?;
        }
        let cache = comm.agree(Self::open(dir, spec))?;
        Ok(Self {
            resumed_from,
            ..cache
        })
    }

    /// Rank 0's start of a build: creates `dir` and the partial file of `len` bytes, merges
    /// the progress of earlier processes (of any world size) into `progress.json`, and
    /// returns the windows done.
    fn start_build(
        spec: &LabelCacheSpec,
        dir: &Path,
        partial: &Path,
        len: u64,
    ) -> Result<Vec<(usize, usize)>> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let mut done = Vec::new();
        if partial.is_file() {
            for f in progress_files(dir) {
                if let Some(p) = std::fs::read_to_string(&f)
                    .ok()
                    .and_then(|t| serde_json::from_str::<Progress>(&t).ok())
                    .filter(|p| p.spec == *spec)
                {
                    done.push((0, p.done));
                    done.extend(p.intervals);
                }
            }
        }
        let done = merge(done);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(partial)
            .map_err(|e| file_err(partial, e))?;
        file.set_len(len).map_err(|e| file_err(partial, e))?;
        let prefix = match done.first() {
            Some(&(0, b)) => b,
            _ => 0,
        };
        write_json_atomic(
            &dir.join("progress.json"),
            &Progress {
                spec: spec.clone(),
                done: prefix,
                intervals: done.iter().copied().filter(|&(a, _)| a > 0).collect(),
            },
        )?;
        for f in progress_files(dir) {
            if f.file_name().is_some_and(|n| n != "progress.json") {
                std::fs::remove_file(f).ok();
            }
        }
        Ok(done)
    }

    /// Labels the windows of `intervals`, `batch` at a time, into their offsets of the
    /// partial file, recording each finished batch in this rank's progress file. Returns
    /// the number of windows labelled.
    #[allow(clippy::too_many_arguments)]
    fn label_windows(
        teacher: &dyn CausalLm,
        sae: &Sae,
        spec: &LabelCacheSpec,
        shard: &TokenShard,
        dir: &Path,
        partial: &Path,
        intervals: &[(usize, usize)],
        batch: usize,
        (rank, world): (usize, usize),
    ) -> Result<usize> {
        let label_bytes = if spec.n_latents <= 1 << 16 { 2 } else { 4 };
        let per_window = spec.window * spec.k_attr * label_bytes;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(partial)
            .map_err(|e| file_err(partial, e))?;
        let total: usize = intervals.iter().map(|(a, b)| b - a).sum();
        let prefix = if world > 1 {
            format!("labels {rank}/{world}")
        } else {
            "labels".into()
        };
        let bar = if rank == 0 {
            cocomix_data::progress_bar(total as u64, &prefix)
        } else {
            indicatif::ProgressBar::hidden()
        };
        let progress_path = dir.join(format!("progress-rank{rank}.json"));
        let dev = teacher.device().clone();
        let mut finished: Vec<(usize, usize)> = Vec::new();
        for &(a, b) in intervals {
            let mut w0 = a;
            while w0 < b {
                let nb = batch.max(1).min(b - w0);
                let mut ids = Vec::with_capacity(nb * spec.window);
                for w in w0..w0 + nb {
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
                file.seek(SeekFrom::Start((w0 * per_window) as u64))
                    .map_err(|e| file_err(partial, e))?;
                file.write_all(&bytes).map_err(|e| file_err(partial, e))?;
                file.sync_data().map_err(|e| file_err(partial, e))?;
                finished.push((w0, w0 + nb));
                finished = merge(finished);
                write_json_atomic(
                    &progress_path,
                    &Progress {
                        spec: spec.clone(),
                        done: 0,
                        intervals: finished.clone(),
                    },
                )?;
                w0 += nb;
                bar.inc(nb as u64);
            }
        }
        bar.finish_and_clear();
        Ok(finished.iter().map(|(a, b)| b - a).sum())
    }
}

/// `progress.json` and the ranks' `progress-rank<r>.json` of a cache folder.
fn progress_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("progress") && n.ends_with(".json"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_intervals_merge_complement_and_split() {
        assert_eq!(
            merge(vec![(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]),
            [(0, 3), (5, 9)]
        );
        assert_eq!(missing(&[(0, 3), (5, 9)], 12), [(3, 5), (9, 12)]);
        assert_eq!(missing(&[], 4), [(0, 4)]);
        assert_eq!(missing(&[(0, 4)], 4), []);
        // 5 windows to do, split over 2 ranks as 0..2 and 2..5 of their concatenation.
        let todo = [(3, 5), (9, 12)];
        assert_eq!(take(&todo, 0..2), [(3, 5)]);
        assert_eq!(take(&todo, 2..5), [(9, 12)]);
        assert_eq!(take(&todo, 1..4), [(4, 5), (9, 11)]);
    }
}
