//! Concept steering: edits of a `[N, C]` tensor of concept logits (the CoCoMix student's
//! predicted concepts) or SAE latents, shared by the student and SAE steering.
use candle_core::{Tensor, D};

use crate::{Error, Result};

/// How a steering entry changes a concept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SteerMode {
    /// `z[c] += value`
    Add,
    /// `z[c] = value`
    Set,
}

/// One steering entry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Steer {
    /// The concept (column of `z`).
    pub index: usize,
    /// The amount added, or the value set.
    pub value: f32,
    /// Add or set.
    pub mode: SteerMode,
    /// CoCoMix only: keep the concept among the student's TopK whatever its value (it
    /// replaces the lowest kept). SAE steering edits the latents after their TopK and
    /// ignores it.
    pub force: bool,
}

/// Applies `steer` to every row of `z [N, C]`, entries in order (a `Set` after an `Add` of
/// the same concept overrides it; an `Add` after a `Set` adds to the set value). An empty
/// list returns `z` itself. Errors if an index is not below `C`.
pub fn apply_steer(z: &Tensor, steer: &[Steer]) -> Result<Tensor> {
    if steer.is_empty() {
        return Ok(z.clone());
    }
    let c = z.dim(D::Minus1)?;
    // z' = z ⊙ keep + set + add, with per-concept vectors built in entry order.
    let (mut keep, mut set, mut add) = (vec![1f32; c], vec![0f32; c], vec![0f32; c]);
    for s in steer {
        if s.index >= c {
            return Err(Error::Invalid(format!(
                "steering index {} is out of range for {c} concepts",
                s.index
            )));
        }
        match s.mode {
            SteerMode::Add => add[s.index] += s.value,
            SteerMode::Set => {
                keep[s.index] = 0.0;
                set[s.index] = s.value;
                add[s.index] = 0.0;
            }
        }
    }
    let row = |v: Vec<f32>| Tensor::from_vec(v, c, z.device())?.to_dtype(z.dtype());
    Ok(z.broadcast_mul(&row(keep)?)?
        .broadcast_add(&row(set)?)?
        .broadcast_add(&row(add)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn s(index: usize, value: f32, mode: SteerMode) -> Steer {
        Steer {
            index,
            value,
            mode,
            force: false,
        }
    }

    #[test]
    fn add_set_and_their_order_as_computed_by_hand() {
        let z = Tensor::new(&[[1f32, 2.0, 3.0], [-1.0, 0.5, 4.0]], &Device::Cpu).unwrap();
        let out = apply_steer(
            &z,
            &[
                s(0, 10.0, SteerMode::Add), // col 0: z + 10
                s(1, 7.0, SteerMode::Add),  // col 1: overridden by the Set below
                s(1, -2.0, SteerMode::Set), // col 1: −2
                s(2, 5.0, SteerMode::Set),  // col 2: 5 ...
                s(2, 0.25, SteerMode::Add), // ... + 0.25
                s(0, 1.0, SteerMode::Add),  // col 0: + 1 more
            ],
        )
        .unwrap();
        assert_eq!(
            out.to_vec2::<f32>().unwrap(),
            vec![vec![12.0, -2.0, 5.25], vec![10.0, -2.0, 5.25]]
        );
    }

    #[test]
    fn an_empty_list_is_the_identity_and_a_bad_index_an_error() {
        let z = Tensor::new(&[[1f32, -3.5]], &Device::Cpu).unwrap();
        let same = apply_steer(&z, &[]).unwrap();
        assert_eq!(same.to_vec2::<f32>().unwrap(), z.to_vec2::<f32>().unwrap());
        let err = apply_steer(&z, &[s(2, 1.0, SteerMode::Add)]).unwrap_err();
        assert!(
            err.to_string().contains("out of range for 2 concepts"),
            "{err}"
        );
    }
}
