//! A text's perplexity, word perplexity and bits per byte, as lm-evaluation-harness's
//! WikiText task reports them (the paper's "Wiki PPL" is the word perplexity).
use std::path::Path;

use cocomix_data::Tokenizer;
use cocomix_model::AnyModel;
use serde::Serialize;

use crate::{perplexity, Error, Result};

/// Scores of one text.
#[derive(Clone, Debug, Serialize)]
pub struct TextScore {
    /// Scored predictions.
    pub tokens: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    /// Token perplexity, exp(nll).
    pub ppl: f64,
    /// Window length.
    pub seq_len: usize,
    /// Words as lm-eval counts them ([`count_words`]).
    pub words: usize,
    /// exp(total NLL / words).
    pub word_perplexity: f64,
    /// UTF-8 bytes of the text.
    pub bytes: usize,
    /// total NLL / bytes / ln 2.
    pub bits_per_byte: f64,
}

/// lm-eval's word count, `len(re.split(r"\s+", text))`: the whitespace runs plus one (so
/// leading or trailing whitespace counts an empty word, as there).
pub fn count_words(text: &str) -> usize {
    let mut runs = 0;
    let mut in_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            if !in_space {
                runs += 1;
            }
            in_space = true;
        } else {
            in_space = false;
        }
    }
    runs + 1
}

/// Scores `ids`, the tokens of `text`, with [`perplexity`] windows of `seq_len`; word and
/// byte counts come from `text`. The first id is context only.
pub fn score_ids(
    model: &AnyModel,
    ids: &[u32],
    text: &str,
    seq_len: usize,
    batch: usize,
) -> Result<TextScore> {
    let p = perplexity(model, ids, seq_len, batch)?;
    let (words, bytes) = (count_words(text), text.len());
    Ok(TextScore {
        tokens: p.tokens,
        nll: p.nll,
        ppl: p.ppl,
        seq_len,
        words,
        word_perplexity: (p.total_nll() / words as f64).exp(),
        bytes,
        bits_per_byte: p.total_nll() / bytes as f64 / std::f64::consts::LN_2,
    })
}

/// Scores a whole text as lm-eval's `loglikelihood_rolling` does: the end-of-text token is
/// the context of the first token, so every token of the text is predicted.
pub fn score_text(
    model: &AnyModel,
    tok: &Tokenizer,
    text: &str,
    seq_len: usize,
    batch: usize,
) -> Result<TextScore> {
    let ids: Vec<u32> = std::iter::once(tok.eot_id())
        .chain(tok.encode(text)?)
        .collect();
    if ids.len() < 2 {
        return Err(Error::Invalid(
            "need at least two tokens to score (the text is empty)".into(),
        ));
    }
    score_ids(model, &ids, text, seq_len, batch)
}

/// [`score_text`] of a UTF-8 file; every error names the file.
pub fn score_text_file(
    model: &AnyModel,
    tok: &Tokenizer,
    path: &Path,
    seq_len: usize,
    batch: usize,
) -> Result<TextScore> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    score_text(model, tok, &text, seq_len, batch).map_err(|e| Error::file(path, e))
}
