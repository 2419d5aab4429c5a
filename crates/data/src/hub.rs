//! `hf://datasets/OWNER/NAME[@REVISION]/PATH_GLOB`: files of a Hugging Face dataset,
//! listed on the Hub, downloaded into the hub cache by hf-hub, then read like local files.
//!
//! When the Hub cannot be reached (or `HF_HUB_OFFLINE=1`), the matching files of the cached
//! snapshot of that revision are used; with neither, the error says so. `HF_HOME`,
//! `HF_ENDPOINT` and `HF_TOKEN` are honoured.
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::{Error, Result};

/// Prefix of hub inputs.
pub(crate) const SCHEME: &str = "hf://";

const USAGE: &str = "expected hf://datasets/OWNER/NAME[@REVISION]/PATH_GLOB, e.g. \
     hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet (a REVISION with slashes \
     written with %2F, e.g. @refs%2Fconvert%2Fparquet)";

#[derive(Debug, PartialEq, Eq)]
struct HubSpec {
    repo: String,
    revision: String,
    pattern: String,
}

fn parse(spec: &str) -> Result<HubSpec> {
    let bad = |why: &str| Error::Other(format!("{spec}: {why}; {USAGE}"));
    let rest = spec.strip_prefix(SCHEME).unwrap_or(spec);
    let rest = rest
        .strip_prefix("datasets/")
        .ok_or_else(|| bad("only dataset repositories hold corpora"))?;
    let mut parts = rest.splitn(3, '/');
    let (owner, name, pattern) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if owner.is_empty() || name.is_empty() || pattern.is_empty() {
        return Err(bad("needs an owner, a dataset name and a path or glob"));
    }
    let (name, revision) = match name.split_once('@') {
        Some((n, r)) if !n.is_empty() && !r.is_empty() => (n, percent_decode(r)),
        Some(_) => return Err(bad("empty name or revision around @")),
        None => (name, "main".to_string()),
    };
    glob::Pattern::new(pattern).map_err(|e| bad(&format!("bad glob {pattern:?}: {e}")))?;
    Ok(HubSpec {
        repo: format!("{owner}/{name}"),
        revision,
        pattern: pattern.to_string(),
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn matcher(pattern: &str) -> impl Fn(&str) -> bool {
    let p = glob::Pattern::new(pattern).ok();
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    move |name| p.as_ref().is_some_and(|p| p.matches_with(name, options))
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"))
}

/// Local paths of the dataset files `spec` matches, in name order.
pub(crate) fn resolve(spec: &str) -> Result<Vec<PathBuf>> {
    let s = parse(spec)?;
    let cache = Cache::from_env();
    let repo = Repo::with_revision(s.repo.clone(), RepoType::Dataset, s.revision.clone());
    let listing = if offline() {
        Err("HF_HUB_OFFLINE is set".to_string())
    } else {
        list_remote(&repo)
    };
    let names = match listing {
        Ok(names) => names,
        Err(why) => {
            let cached = cached_files(&cache, &repo, &s.pattern)?;
            if cached.is_empty() {
                return Err(Error::Other(format!(
                    "{spec}: could not list datasets/{}@{} on the Hugging Face Hub ({why}), and \
                     the hub cache {} holds no file of it matching {:?}: download it where the \
                     Hub is reachable (same HF_HOME) or pass local files",
                    s.repo,
                    s.revision,
                    cache.path().display(),
                    s.pattern
                )));
            }
            tracing::warn!(
                "{spec}: the Hub is unreachable ({why}); using {} cached file(s)",
                cached.len()
            );
            return Ok(cached);
        }
    };
    let is_match = matcher(&s.pattern);
    let mut matched: Vec<&String> = names.iter().filter(|n| is_match(n)).collect();
    matched.sort();
    if matched.is_empty() {
        let examples: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
        return Err(Error::Other(format!(
            "{spec}: no file of datasets/{}@{} matches {:?} (it holds {} files, e.g. {})",
            s.repo,
            s.revision,
            s.pattern,
            names.len(),
            examples.join(", ")
        )));
    }
    let api = api()
        .map_err(|e| Error::Other(format!("{spec}: {e}")))?
        .repo(repo);
    matched
        .into_iter()
        .map(|name| {
            tracing::info!("{spec}: fetching {name}");
            api.get(name)
                .map_err(|e| Error::Other(format!("{spec}: downloading {name}: {e}")))
        })
        .collect()
}

fn api() -> std::result::Result<hf_hub::api::sync::Api, hf_hub::api::sync::ApiError> {
    let mut builder =
        ApiBuilder::from_env().with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    builder.build()
}

/// Every file name of the repository at its revision, from the Hub.
fn list_remote(repo: &Repo) -> std::result::Result<Vec<String>, String> {
    let info = api()
        .and_then(|api| api.repo(repo.clone()).info())
        .map_err(|e| e.to_string())?;
    Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
}

/// The files of the cached snapshot of `repo` whose repository path matches `pattern`.
fn cached_files(cache: &Cache, repo: &Repo, pattern: &str) -> Result<Vec<PathBuf>> {
    let root = cache.path().join(repo.folder_name());
    let revision = repo.revision();
    let commit = std::fs::read_to_string(root.join("refs").join(revision))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let snapshot = root.join("snapshots").join(commit);
    let mut names = Vec::new();
    if snapshot.is_dir() {
        list_files(&snapshot, "", &mut names)?;
    }
    let is_match = matcher(pattern);
    let mut out: Vec<PathBuf> = names
        .into_iter()
        .filter(|n| is_match(n))
        .map(|n| snapshot.join(n))
        .collect();
    out.sort();
    Ok(out)
}

/// Repository paths (`a/b.parquet`) of the files under `dir`.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        // Snapshot files are symlinks into blobs/: follow them.
        if e.path().is_dir() {
            list_files(&e.path(), &rel, out)?;
        } else {
            out.push(rel);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            parse("hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet").unwrap(),
            HubSpec {
                repo: "HuggingFaceFW/fineweb-edu".into(),
                revision: "main".into(),
                pattern: "sample/10BT/*.parquet".into()
            }
        );
        let s = parse("hf://datasets/o/n@refs%2Fconvert%2Fparquet/plain_text/train/*").unwrap();
        assert_eq!(
            (s.repo.as_str(), s.revision.as_str()),
            ("o/n", "refs/convert/parquet")
        );
        for bad in [
            "hf://models/gpt2/x.parquet",
            "hf://datasets/o/n",
            "hf://datasets/o//x",
            "hf://datasets/o/n@/x",
            "hf://datasets/o/n/[",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(
                e.starts_with(bad) && e.contains("hf://datasets/OWNER"),
                "{e}"
            );
        }
    }

    #[test]
    fn globs_do_not_cross_folders() {
        let m = matcher("data/*.parquet");
        assert!(m("data/a.parquet"));
        assert!(!m("data/sub/a.parquet"));
        assert!(matcher("data/**/*.parquet")("data/sub/a.parquet"));
        assert!(matcher("README.md")("README.md"));
    }
}
