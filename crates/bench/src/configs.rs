//! The benchmark shapes, read from the project's run configs (not repeated here).
use std::path::{Path, PathBuf};

use cocomix_model::{Gpt2Config, StudentConfig};
use cocomix_trainer::{Objective, RunConfig, Source};

use crate::{Error, Result};

/// A run config the benchmarks take their shapes from, and the file it came from.
pub struct BenchConfig {
    /// Path of the config in the repository, reported in each case's JSON (`config`).
    pub file: &'static str,
    /// The parsed config.
    pub run: RunConfig,
}

impl BenchConfig {
    /// `configs/default.toml`: the embedded default's students, teacher and SAE.
    pub fn default_toml() -> Result<Self> {
        Self::parse(
            "configs/default.toml",
            include_str!("../../../configs/default.toml"),
        )
    }

    /// `configs/gpt2-69m.toml`: the paper's 69M setting (GPT-2 124M teacher, C = 32768).
    pub fn gpt2_69m() -> Result<Self> {
        Self::parse(
            "configs/gpt2-69m.toml",
            include_str!("../../../configs/gpt2-69m.toml"),
        )
    }

    fn parse(file: &'static str, text: &str) -> Result<Self> {
        let run =
            RunConfig::from_toml(text, &[]).map_err(|e| Error::Other(format!("{file}: {e}")))?;
        Ok(Self { file, run })
    }

    /// Vocabulary size and EOT id of the config's tokenizer: `data.vocab_size` for a trained
    /// BPE (its one special token, EOT, comes first: id 0), the bundled GPT-2 tokenizer's, or
    /// those of a tokenizer file in the repository (the default's `assets/teacher/`).
    pub fn vocab(&self) -> Result<(usize, u32)> {
        let d = &self.run.data;
        let tok = match (d.tokenizer.as_str(), d.vocab_size) {
            ("train", Some(v)) => return Ok((v, 0)),
            ("gpt2", _) => cocomix_data::Tokenizer::gpt2()?,
            (file, _) => cocomix_data::Tokenizer::load(&repo_path(file).to_string_lossy())
                .map_err(|e| Error::Other(format!("{}: data.tokenizer: {e}", self.file)))?,
        };
        Ok((tok.vocab_size(), tok.eot_id()))
    }

    /// The student the config trains for `objective` (C = `sae.n_latents` for CoCoMix).
    pub fn student(&self, objective: Objective) -> Result<StudentConfig> {
        let (vocab, eot) = self.vocab()?;
        Ok(cocomix_trainer::pipeline::student_config(
            &self.run,
            objective,
            vocab,
            eot,
            self.run.sae.n_latents,
        ))
    }

    /// The teacher's shape: `[teacher.train]` for a trained one, GPT-2 124M for
    /// `openai-community/gpt2` (random weights: the bench runs offline), the `config.json` of
    /// a teacher folder in the repository (the default's `assets/teacher/`).
    pub fn teacher(&self) -> Result<Gpt2Config> {
        let (vocab, eot) = self.vocab()?;
        match &self.run.teacher.source {
            Source::Load(s) if repo_path(s).join("config.json").is_file() => {
                Ok(Gpt2Config::from_file(&repo_path(s).join("config.json"))?)
            }
            Source::Train => {
                let t = self.run.teacher.train.as_ref().ok_or_else(|| {
                    Error::Other(format!("{}: teacher.source = \"train\" without [teacher.train]", self.file))
                })?;
                Ok(
                    Gpt2Config::new(vocab, self.run.model.context, t.d_model, t.n_layer, t.n_head)
                        .with_eot(eot),
                )
            }
            Source::Load(s) if s == "openai-community/gpt2" || s == "gpt2" => {
                Ok(Gpt2Config::gpt2_small())
            }
            Source::Load(s) => Err(Error::Other(format!(
                "{}: the bench knows the shape of openai-community/gpt2 and of trained teachers, not {s:?}",
                self.file
            ))),
        }
    }
}

/// A path of a config, relative to the repository root (where `cargo xtask` runs) whatever
/// the working directory.
fn repo_path(p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_relative() && !p.exists() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(p)
    } else {
        p.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_the_config_files_ones() {
        let d = BenchConfig::default_toml().unwrap();
        let s = d.student(Objective::Cocomix).unwrap();
        let c = s.concept.as_ref().unwrap();
        assert_eq!(
            (
                s.gpt2.vocab_size,
                s.gpt2.n_positions,
                s.gpt2.n_embd,
                s.gpt2.n_layer
            ),
            (2048, 128, 96, 4)
        );
        assert_eq!(
            (c.concept_dim, c.concept_num, c.insert_layer_index),
            (4096, 16, 1)
        );
        assert_eq!(d.student(Objective::Ntp).unwrap().gpt2.n_embd, 128);
        // The shipped teacher's own config.json (assets/teacher).
        let t = d.teacher().unwrap();
        assert_eq!((t.n_embd, t.n_layer, t.vocab_size), (256, 6, 2048));
        let p = BenchConfig::gpt2_69m().unwrap();
        let s = p.student(Objective::Cocomix).unwrap();
        let c = s.concept.as_ref().unwrap();
        assert_eq!(
            (
                s.gpt2.vocab_size,
                s.gpt2.n_positions,
                s.gpt2.n_embd,
                s.gpt2.n_layer
            ),
            (50257, 1024, 512, 8)
        );
        assert_eq!(
            (c.concept_dim, c.concept_num, c.insert_layer_index),
            (32768, 32, 3)
        );
        assert_eq!(p.student(Objective::Kd).unwrap().gpt2.n_embd, 624);
        assert_eq!(p.teacher().unwrap(), Gpt2Config::gpt2_small());
    }
}
