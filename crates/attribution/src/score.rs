//! Attribution scores and label selection.
use candle_core::{DType, Tensor};
use cocomix_model::CausalLm;
use cocomix_sae::{Sae, SparseCodes};

use crate::{Error, Result};

/// How the `K_attr` labels of a token are chosen from its scores.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum LabelMode {
    /// The reference release: the `K_attr` largest **signed** scores over all C latents,
    /// where inactive latents score exactly 0. When fewer than `K_attr` active latents score
    /// above 0, zero-scoring latents fill in, lowest index first (torch.topk leaves that
    /// order unspecified; we fix it). At the last position every score is 0, so its labels
    /// are the lowest-indexed zero-scoring latents.
    Faithful,
    /// Only active latents (z > 0) are ranked, by signed score. With fewer than `K_attr` of
    /// them, the ranked list repeats cyclically (so the loss weights them more), and a
    /// token with none falls back to the faithful rule.
    ActiveOnly,
    /// As `ActiveOnly`, ranked by the **most negative** score: the concepts whose removal
    /// would raise the teacher's loss the most (to first order), i.e. the opposite sign of
    /// the reference release's choice.
    Negative,
    /// As `ActiveOnly`, ranked by |score|.
    Magnitude,
    /// As `ActiveOnly`, ranked by the SAE activation z instead of the attribution (the
    /// paper's activation-vs-attribution ablation).
    Activation,
}

impl LabelMode {
    /// Every mode, with the names configs use.
    pub const ALL: [LabelMode; 5] = [
        LabelMode::Faithful,
        LabelMode::ActiveOnly,
        LabelMode::Negative,
        LabelMode::Magnitude,
        LabelMode::Activation,
    ];

    /// The name configs and the CLI use.
    pub fn name(self) -> &'static str {
        match self {
            LabelMode::Faithful => "faithful",
            LabelMode::ActiveOnly => "active-only",
            LabelMode::Negative => "negative",
            LabelMode::Magnitude => "magnitude",
            LabelMode::Activation => "activation",
        }
    }
}

impl std::fmt::Display for LabelMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LabelMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                Error::Other(format!(
                    "label mode {s:?}: expected one of {}",
                    Self::ALL.map(|m| m.name()).join(", ")
                ))
            })
    }
}

/// Attribution of the active latents of `N = B·T` tokens.
pub struct Attribution {
    /// The SAE codes of the teacher's residual (indices/values `[N, w]`: `w = k` for a TopK
    /// SAE, the batch's largest active count for ReLU/JumpReLU SAEs, see [`SparseCodes`]).
    pub codes: SparseCodes,
    /// `a = z · ⟨g, W_dec[:, i]⟩` for each kept latent, `[N, w]` (0 at value-0 padding).
    pub scores: Tensor,
    /// The teacher's mean next-token loss on the batch.
    pub teacher_loss: f32,
}

/// Attribution scores for `ids [B, T]`: x and g from the teacher's `residual_grad` at
/// `layer`, z from the SAE, and one dot product of g with a decoder column per kept latent.
/// The same rule for every SAE type (TopK, ReLU, JumpReLU; any input normalisation).
pub fn attribute(
    teacher: &dyn CausalLm,
    sae: &Sae,
    ids: &Tensor,
    layer: usize,
) -> Result<Attribution> {
    let d = teacher.d_model();
    sae.check_input_width(d, &format!("the teacher at layer {layer}"))?;
    let rg = teacher.residual_grad(ids, layer)?;
    let g = rg.grad.reshape(((), d))?; // [N, d]
    let codes = sae.encode(&rg.hidden)?;
    let scores = (sae.decoder_dots(&codes.indices, &g)? * &codes.values)?; // [N, w]
    Ok(Attribution {
        codes,
        scores,
        teacher_loss: rg.loss,
    })
}

/// The dense reference `a = (g @ W_dec) ⊙ z`, `[N, C]` (tests only: O(N·d·C)).
pub fn attribute_dense(
    teacher: &dyn CausalLm,
    sae: &Sae,
    ids: &Tensor,
    layer: usize,
) -> Result<Tensor> {
    let rg = teacher.residual_grad(ids, layer)?;
    let g = rg.grad.reshape(((), teacher.d_model()))?;
    let z = sae.dense(&sae.encode(&rg.hidden)?)?;
    Ok((g.matmul(&sae.w_dec().t()?)? * z)?) // W_dec [C, d]
}

/// The `K_attr` labels of each token and their scores, `([N, K_attr] u32, [N, K_attr])`.
pub fn labels(
    att: &Attribution,
    n_latents: usize,
    k_attr: usize,
    mode: LabelMode,
) -> Result<(Tensor, Tensor)> {
    if k_attr == 0 || k_attr > n_latents {
        return Err(Error::Other(format!(
            "K_attr = {k_attr} must be in 1..={n_latents}"
        )));
    }
    let idx: Vec<Vec<u32>> = att.codes.indices.to_vec2()?;
    let val: Vec<Vec<f32>> = att.codes.values.to_vec2()?;
    let sc: Vec<Vec<f32>> = att.scores.to_dtype(DType::F32)?.to_vec2()?;
    let mut out_i = Vec::with_capacity(idx.len() * k_attr);
    let mut out_s = Vec::with_capacity(idx.len() * k_attr);
    for ((i, z), a) in idx.iter().zip(&val).zip(&sc) {
        let row = select(i, z, a, n_latents, k_attr, mode);
        out_i.extend(row.iter().map(|p| p.0));
        out_s.extend(row.iter().map(|p| p.1));
    }
    let n = idx.len();
    let dev = att.scores.device();
    Ok((
        Tensor::from_vec(out_i, (n, k_attr), dev)?,
        Tensor::from_vec(out_s, (n, k_attr), dev)?,
    ))
}

fn by_score_then_index(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// One token's labels. `idx`/`z`/`a`: its kept latents, activations and scores.
fn select(
    idx: &[u32],
    z: &[f32],
    a: &[f32],
    n_latents: usize,
    k: usize,
    mode: LabelMode,
) -> Vec<(u32, f32)> {
    // The ranking key of an active latent `(z, a)` in the active-only family.
    let key: Option<fn(f32, f32) -> f32> = match mode {
        LabelMode::Faithful => None,
        LabelMode::ActiveOnly => Some(|_, a| a),
        LabelMode::Negative => Some(|_, a| -a),
        LabelMode::Magnitude => Some(|_, a| a.abs()),
        LabelMode::Activation => Some(|z, _| z),
    };
    if let Some(key) = key {
        // (index, key, score): ranked by key, the label keeps its attribution score.
        let mut active: Vec<(u32, f32, f32)> = idx
            .iter()
            .zip(z)
            .zip(a)
            .filter(|((_, &z), _)| z > 0.0)
            .map(|((&i, &z), &s)| (i, key(z, s), s))
            .collect();
        if !active.is_empty() {
            active.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
            return (0..k)
                .map(|j| active[j % active.len()])
                .map(|(i, _, s)| (i, s))
                .collect();
        }
    }
    // Faithful: the dense score vector is 0 except at active latents; take its top k.
    let mut nonzero: Vec<(u32, f32)> = idx
        .iter()
        .zip(a)
        .filter(|(_, &s)| s != 0.0)
        .map(|(&i, &s)| (i, s))
        .collect();
    nonzero.sort_by(by_score_then_index);
    let mut out: Vec<(u32, f32)> = nonzero
        .iter()
        .filter(|p| p.1 > 0.0)
        .take(k)
        .copied()
        .collect();
    let mut c = 0u32;
    while out.len() < k && (c as usize) < n_latents {
        if !nonzero.iter().any(|p| p.0 == c) {
            out.push((c, 0.0));
        }
        c += 1;
    }
    out.extend(nonzero.iter().filter(|p| p.1 < 0.0).take(k - out.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faithful_and_active_only_differ_exactly_when_few_scores_are_positive() {
        // Active latents 7 (a = 0.5), 3 (a = −0.2), 9 (z = 0 after ReLU, a = 0), 1 (a = 0.1).
        let idx = [7u32, 3, 9, 1];
        let z = [2.0f32, 1.0, 0.0, 0.5];
        let a = [0.5f32, -0.2, 0.0, 0.1];
        // Faithful: positives 7, 1; then zero-scoring latents by index: 0, 2 (1 and 3 are
        // taken / negative; 9 is zero but has a higher index).
        let f = select(&idx, &z, &a, 12, 4, LabelMode::Faithful);
        assert_eq!(f, vec![(7, 0.5), (1, 0.1), (0, 0.0), (2, 0.0)]);
        // Active-only ranks the three active latents (z > 0) and cycles.
        let o = select(&idx, &z, &a, 12, 4, LabelMode::ActiveOnly);
        assert_eq!(o, vec![(7, 0.5), (1, 0.1), (3, -0.2), (7, 0.5)]);
        // The sign ablation ranks the most negative first; magnitude by |a|; activation by z.
        let n = select(&idx, &z, &a, 12, 3, LabelMode::Negative);
        assert_eq!(n, vec![(3, -0.2), (1, 0.1), (7, 0.5)]);
        let m = select(&idx, &z, &a, 12, 3, LabelMode::Magnitude);
        assert_eq!(m, vec![(7, 0.5), (3, -0.2), (1, 0.1)]);
        let act = select(&idx, &z, &a, 12, 4, LabelMode::Activation);
        assert_eq!(act, vec![(7, 0.5), (3, -0.2), (1, 0.1), (7, 0.5)]);
        // With ≥ K_attr positive scores the two modes agree.
        let a2 = [0.5f32, 0.2, 0.3, 0.1];
        let z2 = [2.0f32, 1.0, 0.3, 0.5];
        assert_eq!(
            select(&idx, &z2, &a2, 12, 3, LabelMode::Faithful),
            select(&idx, &z2, &a2, 12, 3, LabelMode::ActiveOnly)
        );
        // Ties at equal scores go to the lower index.
        let t = select(
            &[5, 2, 8],
            &[1.0, 1.0, 1.0],
            &[0.3, 0.3, 0.3],
            10,
            2,
            LabelMode::Faithful,
        );
        assert_eq!(t, vec![(2, 0.3), (5, 0.3)]);
        // Nearly everything negative in a tiny latent space: negatives come last.
        let n = select(
            &[0, 1, 2],
            &[1.0, 1.0, 1.0],
            &[-0.1, -0.3, -0.2],
            4,
            4,
            LabelMode::Faithful,
        );
        assert_eq!(n, vec![(3, 0.0), (0, -0.1), (2, -0.2), (1, -0.3)]);
    }
}
