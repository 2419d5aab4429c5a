//! Toy corpora shared by the trainer's test files (`mod common;`): each file uses some.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

use cocomix_data::{prepare, Dataset, PrepareOptions, Tokenizer};

/// Config overrides of a tiny student (2 blocks, d = 16, T = 16, K_attr 2, K_c 4).
pub const TINY_STUDENT: [&str; 8] = [
    "model.n_layer=2",
    "model.d_model=16",
    "model.d_model_ntp=16",
    "model.n_head=2",
    "model.context=16",
    "concept.insert_layer=1",
    "concept.k_attr=2",
    "concept.concept_num=4",
];

/// `n` sentences "The {word} cat sat on mat number {i mod numbers}." cycling over `words`: a
/// text a small BPE learns merges from and a tiny model can fit.
pub fn toy_text(n: usize, words: &[&str], numbers: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "The {} cat sat on mat number {}. ",
                words[i % words.len()],
                i % numbers
            )
        })
        .collect()
}

/// `text` and its tail from byte `tail` as `dir/corpus.txt` and `dir/corpus2.txt` (two
/// documents, so the validation split has one of its own).
pub fn two_docs(dir: &Path, text: &str, tail: usize) -> Vec<PathBuf> {
    let (a, b) = (dir.join("corpus.txt"), dir.join("corpus2.txt"));
    std::fs::write(&a, text).unwrap();
    std::fs::write(&b, &text[tail..]).unwrap();
    vec![a, b]
}

/// Six overlapping documents (`text` from bytes 0, 100, …, 500) in the folder `dir/corpus`.
pub fn six_docs(dir: &Path, text: &str) -> Vec<PathBuf> {
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    for i in 0..6 {
        std::fs::write(corpus.join(format!("{i}.txt")), &text[i * 100..]).unwrap();
    }
    vec![corpus]
}

/// `inputs` tokenized into `dir/data` by a 300-token BPE trained on `text`, opened.
pub fn prepare_toy(
    dir: &Path,
    text: &str,
    inputs: Vec<PathBuf>,
    val_fraction: f64,
) -> (Dataset, Tokenizer) {
    let tok = Tokenizer::train_bpe([text].into_iter(), 300).unwrap();
    let opts = PrepareOptions {
        val_fraction,
        ..PrepareOptions::new(inputs, dir.join("data"))
    };
    prepare(&opts, &tok).unwrap();
    (Dataset::open(dir.join("data")).unwrap(), tok)
}
