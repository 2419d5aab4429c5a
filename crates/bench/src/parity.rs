//! `cocomix parity`: the golden tiny batch (`testdata/golden/`) computed on the CPU and on
//! this build's device, compared **by tensor name** with the device result against both the
//! CPU result and the golden values of the independent PyTorch reference.
//!
//! A tensor fails when it is missing from the result or extra in it, has another shape,
//! holds a NaN or an infinity, or differs beyond its tolerance somewhere.
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use cocomix_attribution::{attribute, labels, LabelMode};
use cocomix_model::ops::{causal_attention_composed, concept_loss, dropout, kd_kl, DropoutKey};
use cocomix_model::{next_token_loss, Dropout, Gpt2, Student};
use cocomix_sae::Sae;
use serde::Serialize;

use crate::{Error, Result};

/// The golden batch's settings (testdata/golden/README.md): the SAE reads the output of
/// block 1; 4 labels per token; λ = 0.1.
const LAYER: usize = 1;
const K_ATTR: usize = 4;
const LAMBDA: f64 = 0.1;

/// Tensors by name.
pub type Tensors = BTreeMap<String, Tensor>;

/// How a tensor must agree with its reference: `|got − want| ≤ atol + rtol·|want|` at every
/// compared element (all of them, or those where `only` is true).
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// Relative tolerance.
    pub rtol: f32,
    /// Absolute tolerance.
    pub atol: f32,
    /// Compare only the elements where this (flattened) mask is true.
    pub only: Option<Vec<bool>>,
}

impl Rule {
    /// Every element within `atol + rtol·|want|`.
    pub fn close(rtol: f32, atol: f32) -> Self {
        Self {
            rtol,
            atol,
            only: None,
        }
    }
}

/// Why a tensor failed.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Failure {
    /// In the reference, not in the result.
    Missing,
    /// In the result, not in the reference.
    Extra,
    /// Different dimensions.
    Shape {
        /// The reference's dimensions.
        expected: Vec<usize>,
        /// The result's.
        got: Vec<usize>,
    },
    /// NaN or ±∞ (`in_reference`: in the reference's values rather than the result's).
    NonFinite {
        /// How many values.
        count: usize,
        /// Flat index of the first.
        first_index: usize,
        /// Found in the reference rather than the result.
        in_reference: bool,
    },
    /// Beyond the tolerance at `index` (the worst element).
    Tolerance {
        /// Flat index of the element furthest beyond its tolerance.
        index: usize,
        /// The result's value there.
        got: f32,
        /// The reference's value there.
        expected: f32,
        /// Largest |got − want| over the compared elements.
        max_abs_diff: f32,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Missing => write!(f, "missing"),
            Failure::Extra => write!(f, "extra (not in the reference)"),
            Failure::Shape { expected, got } => write!(f, "shape {got:?}, expected {expected:?}"),
            Failure::NonFinite {
                count,
                first_index,
                in_reference,
            } => write!(
                f,
                "{count} NaN/Inf value(s){}, first at element {first_index}",
                if *in_reference { " in the reference" } else { "" }
            ),
            Failure::Tolerance {
                index,
                got,
                expected,
                max_abs_diff,
            } => write!(
                f,
                "beyond tolerance: element {index} is {got} vs {expected} (max |Δ| {max_abs_diff:.3e})"
            ),
        }
    }
}

/// The comparison of one tensor.
#[derive(Clone, Debug, Serialize)]
pub struct TensorCheck {
    /// The tensor's name.
    pub tensor: String,
    /// The reference: `cpu` or `golden`.
    pub against: String,
    /// Relative tolerance used.
    pub rtol: f32,
    /// Absolute tolerance used.
    pub atol: f32,
    /// Largest |got − want| over the compared elements (when shapes agree and all is finite).
    pub max_abs_diff: Option<f32>,
    /// No failure.
    pub ok: bool,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// Compares `result` with `reference` tensor by tensor, by name. Every reference tensor
/// must be in the result; with `extra_is_failure`, every result tensor must be in the
/// reference too.
pub fn compare(
    against: &str,
    reference: &Tensors,
    result: &Tensors,
    extra_is_failure: bool,
    rule: impl Fn(&str) -> Rule,
) -> Result<Vec<TensorCheck>> {
    let mut checks = Vec::new();
    for (name, want) in reference {
        let r = rule(name);
        let (max_abs_diff, failure) = match result.get(name) {
            None => (None, Some(Failure::Missing)),
            Some(got) if got.dims() != want.dims() => (
                None,
                Some(Failure::Shape {
                    expected: want.dims().to_vec(),
                    got: got.dims().to_vec(),
                }),
            ),
            Some(got) => {
                let (g, w) = (values(got)?, values(want)?);
                if let Some(only) = &r.only {
                    if only.len() != w.len() {
                        return Err(Error::Other(format!(
                            "parity rule of {name}: mask of {} for {} values",
                            only.len(),
                            w.len()
                        )));
                    }
                }
                within(&g, &w, &r)
            }
        };
        checks.push(TensorCheck {
            tensor: name.clone(),
            against: against.into(),
            rtol: r.rtol,
            atol: r.atol,
            max_abs_diff,
            ok: failure.is_none(),
            failure,
        });
    }
    if extra_is_failure {
        for name in result.keys().filter(|n| !reference.contains_key(*n)) {
            checks.push(TensorCheck {
                tensor: name.clone(),
                against: against.into(),
                rtol: 0.0,
                atol: 0.0,
                max_abs_diff: None,
                ok: false,
                failure: Some(Failure::Extra),
            });
        }
    }
    Ok(checks)
}

/// (max |Δ|, failure) of values of equal length.
fn within(got: &[f32], want: &[f32], r: &Rule) -> (Option<f32>, Option<Failure>) {
    for (vals, in_reference) in [(got, false), (want, true)] {
        let bad: Vec<usize> = (0..vals.len()).filter(|&i| !vals[i].is_finite()).collect();
        if let Some(&first_index) = bad.first() {
            let f = Failure::NonFinite {
                count: bad.len(),
                first_index,
                in_reference,
            };
            return (None, Some(f));
        }
    }
    let compared = |i: &usize| r.only.as_ref().is_none_or(|m| m[*i]);
    let (mut max_abs, mut worst) = (0f32, None::<(usize, f32)>);
    for i in (0..got.len()).filter(compared) {
        let diff = (got[i] - want[i]).abs();
        max_abs = max_abs.max(diff); // both finite: no NaN to skip
        let excess = diff - (r.atol + r.rtol * want[i].abs());
        if excess > 0.0 && worst.is_none_or(|w| excess > w.1) {
            worst = Some((i, excess));
        }
    }
    let failure = worst.map(|(index, _)| Failure::Tolerance {
        index,
        got: got[index],
        expected: want[index],
        max_abs_diff: max_abs,
    });
    (Some(max_abs), failure)
}

/// Device against CPU, both computed here by the same code: values 1e-4 relative,
/// gradients and attribution scores 1e-3, labels exact.
pub fn cpu_rule(name: &str) -> Rule {
    match name {
        "labels" | "dropout_f32" | "dropout_bf16" => Rule::close(0.0, 0.0),
        n if n.starts_with("grad.")
            || n == "teacher_resid_grad"
            || n == "attribution"
            || n == "label_scores" =>
        {
            Rule::close(1e-3, 1e-6)
        }
        _ => Rule::close(1e-4, 1e-5),
    }
}

/// Against the golden values of the independent PyTorch reference, with the tolerances of
/// the crates' golden tests. `labels` is compared only where the golden score is positive:
/// elsewhere the label is a tie among equal scores and any tied index is right.
pub fn golden_rule(golden: &Tensors) -> Result<impl Fn(&str) -> Rule> {
    let positive: Option<Vec<bool>> = golden
        .get("label_scores")
        .map(|s| values(s).map(|v| v.iter().map(|&x| x > 0.0).collect()))
        .transpose()?;
    Ok(move |name: &str| match name {
        "labels" => Rule {
            only: positive.clone(),
            ..Rule::close(0.0, 0.0)
        },
        "teacher_logits" | "student_logits" => Rule::close(1e-4, 1e-4),
        n if n.starts_with("loss_") || n == "teacher_loss" => Rule::close(0.0, 1e-4),
        n if n.starts_with("grad.") => Rule::close(1e-3, 1e-6),
        "teacher_resid_grad" | "attribution" | "label_scores" => Rule::close(1e-3, 1e-7),
        _ => Rule::close(1e-4, 1e-5),
    })
}

/// The golden expected values (`expected.safetensors`) without the input ids.
pub fn load_golden(golden_dir: &Path) -> Result<Tensors> {
    let path = golden_dir.join("expected.safetensors");
    let mut t: Tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?
        .into_iter()
        .collect();
    t.remove("input_ids");
    Ok(t)
}

/// Everything the golden batch yields on `dev`, by the golden file's names (plus a
/// gradient for every student parameter), moved to the CPU as f32. The concept loss uses
/// the golden file's labels, as the reference does.
pub fn compute(golden_dir: &Path, dev: &Device) -> Result<Tensors> {
    let path = golden_dir.join("expected.safetensors");
    let exp = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    let get = |name: &str| {
        exp.get(name)
            .ok_or_else(|| Error::Other(format!("{}: no tensor {name}", path.display())))
    };
    let ids = get("input_ids")?.to_dtype(DType::U32)?.to_device(dev)?; // [B, T]
    let (b, t) = ids.dims2()?;
    let golden_labels = get("labels")?.to_dtype(DType::U32)?.to_device(dev)?; // [B, T, K_attr]
    let teacher_dir = golden_dir.join("teacher");
    let teacher = Gpt2::load(&teacher_dir.to_string_lossy(), dev)?;
    let sae = Sae::load_file(&golden_dir.join("sae.safetensors"), dev)?;
    let student = Student::load(&golden_dir.join("student"), dev)?;
    let c = sae.n_latents();

    let teacher_logits = teacher.forward(&ids)?; // [B, T, V]
    let rg = teacher.residual_grad(&ids, LAYER)?;
    let att = attribute(&teacher, &sae, &ids, LAYER)?;
    let (lab, scores) = labels(&att, c, K_ATTR, LabelMode::Faithful)?; // [B·T, K_attr]
    let dense_att = Tensor::zeros((b * t, c), DType::F32, dev)?.scatter(
        &att.codes.indices,
        &att.scores.to_dtype(DType::F32)?,
        1,
    )?; // [B·T, C]
    let out = student.forward(&ids, &mut Dropout::off())?;
    let concept_logits = out
        .concept_logits
        .clone()
        .ok_or_else(|| Error::Other("the golden student has no concept path".into()))?;
    let ntp = next_token_loss(&out.logits, &ids)?;
    let concept = concept_loss(&concept_logits, &golden_labels)?;
    let total = (&ntp + (&concept * LAMBDA)?)?;
    // KD over the T − 1 predicting positions of each row, as the reference averages.
    let kd = kd_kl(
        &out.logits.narrow(1, 0, t - 1)?,
        &teacher_logits.narrow(1, 0, t - 1)?,
        1.0,
    )?;
    let grads = total.backward()?;
    let scalar = |x: &Tensor| x.reshape(1);
    let mut v: Vec<(String, Tensor)> = vec![
        ("teacher_logits".into(), teacher_logits.clone()),
        ("teacher_hidden".into(), rg.hidden),
        (
            "teacher_loss".into(),
            Tensor::new(&[rg.loss], &Device::Cpu)?,
        ),
        ("teacher_resid_grad".into(), rg.grad),
        ("sae_z".into(), sae.dense(&att.codes)?.reshape((b, t, c))?),
        (
            "sae_recon".into(),
            sae.decode(&att.codes)?.reshape((b, t, ()))?,
        ),
        ("attribution".into(), dense_att.reshape((b, t, c))?),
        (
            "labels".into(),
            lab.to_dtype(DType::F32)?.reshape((b, t, K_ATTR))?,
        ),
        ("label_scores".into(), scores.reshape((b, t, K_ATTR))?),
        ("student_logits".into(), out.logits.clone()),
        ("student_concept_logits".into(), concept_logits),
        ("loss_ntp".into(), scalar(&ntp)?),
        ("loss_concept".into(), scalar(&concept)?),
        ("loss_total".into(), scalar(&total)?),
        ("loss_kd".into(), scalar(&kd)?),
    ];
    for (name, var) in student.vars() {
        if let Some(g) = grads.get(var.as_tensor()) {
            v.push((format!("grad.{name}"), g.detach()));
        }
    }
    v.extend(attention_checks(dev)?);
    v.into_iter()
        .map(|(n, x)| Ok((n, x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect()
}

/// Training-mode dropout, which the golden batch (inference) leaves out: the masks a device
/// draws must be the CPU's bit for bit (`dropout_*`), so runs and resumes agree across
/// devices; the composed attention with its dropout and that mask's gradient, and over rows
/// longer than one GPU block with a key offset.
fn attention_checks(dev: &Device) -> Result<Vec<(String, Tensor)>> {
    let key = DropoutKey::new(7, 3, 0.1).with_batch_offset(2);
    let ones = Tensor::ones((3, 5, 37, 70), DType::F32, dev)?;
    let wave = |shape: (usize, usize, usize, usize), phase: f64| -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Ok(Tensor::arange(0u32, n as u32, dev)?
            .to_dtype(DType::F32)?
            .affine(0.37, phase)?
            .sin()?
            .reshape(shape)?)
    };
    // Attention of q against (k, v) and the gradient of Σ y² with respect to q.
    let attend = |q: Tensor, k, v, scale, key| -> Result<(Tensor, Tensor)> {
        let q = candle_core::Var::from_tensor(&q)?;
        let y = causal_attention_composed(q.as_tensor(), &k, &v, scale, key)?;
        let grads = y.sqr()?.sum_all()?.backward()?;
        let g = grads
            .get(q.as_tensor())
            .ok_or_else(|| Error::Other("parity attention: no gradient for q".into()))?;
        Ok((y, g.clone()))
    };
    let (att, grad_q) = attend(
        wave((2, 2, 9, 8), 0.0)?,
        wave((2, 2, 9, 8), 1.0)?,
        wave((2, 2, 9, 8), 2.0)?,
        0.5,
        Some(key),
    )?;
    // Rows longer than a block (300 keys: several warps, strided loops) and queries that are
    // the last 5 of 300 positions (a KV-cache offset).
    let (long, grad_ql) = attend(
        wave((1, 2, 5, 8), 0.5)?,
        wave((1, 2, 300, 8), 1.5)?,
        wave((1, 2, 300, 8), 2.5)?,
        0.3,
        None,
    )?;
    Ok(vec![
        ("attention_long".into(), long),
        ("attention_long_grad_q".into(), grad_ql),
        ("dropout_f32".into(), dropout(&ones, key)?),
        (
            "dropout_bf16".into(),
            dropout(&ones.to_dtype(DType::BF16)?, key)?,
        ),
        ("attention_dropout".into(), att),
        ("attention_dropout_grad_q".into(), grad_q),
    ])
}

/// One failing tensor, for people reading the report.
#[derive(Clone, Debug, Serialize)]
pub struct Failed {
    /// The tensor's name.
    pub tensor: String,
    /// `cpu` or `golden`.
    pub against: String,
    /// The [`Failure`], in words.
    pub reason: String,
}

/// What `cocomix parity` prints.
#[derive(Clone, Debug, Serialize)]
pub struct ParityReport {
    /// The device compared (`Cpu`, `Cuda(..)`, `Metal(..)`).
    pub device: String,
    /// Number of checks (tensor × reference).
    pub compared: usize,
    /// Every failing check.
    pub failed: Vec<Failed>,
    /// Every check.
    pub tensors: Vec<TensorCheck>,
}

impl ParityReport {
    /// Collects the checks.
    pub fn new(device: String, tensors: Vec<TensorCheck>) -> Self {
        let failed = tensors
            .iter()
            .filter_map(|c| {
                c.failure.as_ref().map(|f| Failed {
                    tensor: c.tensor.clone(),
                    against: c.against.clone(),
                    reason: f.to_string(),
                })
            })
            .collect();
        Self {
            device,
            compared: tensors.len(),
            failed,
            tensors,
        }
    }

    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.failed.is_empty()
    }
}

/// The golden batch on the CPU and on `dev`: the device result against the CPU result
/// (every tensor, both ways) and against the golden values (every golden tensor).
pub fn run_parity(golden_dir: &Path, dev: &Device) -> Result<ParityReport> {
    let golden = load_golden(golden_dir)?;
    let cpu = compute(golden_dir, &Device::Cpu)?;
    let device = compute(golden_dir, dev)?;
    let mut checks = compare("cpu", &cpu, &device, true, cpu_rule)?;
    checks.extend(compare(
        "golden",
        &golden,
        &device,
        false,
        golden_rule(&golden)?,
    )?);
    Ok(ParityReport::new(format!("{dev:?}"), checks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn reference() -> Tensors {
        Tensors::from([
            ("loss_total".to_string(), t(&[2.5], &[1])),
            (
                "student_logits".into(),
                t(&[1.0, -2.0, 3.0, 0.5], &[1, 2, 2]),
            ),
            ("grad.wte.weight".into(), t(&[0.1, 0.2, 0.3], &[3])),
        ])
    }

    fn failures(result: &Tensors) -> Vec<(String, Failure)> {
        compare("cpu", &reference(), result, true, cpu_rule)
            .unwrap()
            .into_iter()
            .filter_map(|c| c.failure.map(|f| (c.tensor, f)))
            .collect()
    }

    #[test]
    fn an_identical_result_passes() {
        let checks = compare("cpu", &reference(), &reference(), true, cpu_rule).unwrap();
        assert_eq!(checks.len(), 3);
        assert!(checks.iter().all(|c| c.ok && c.max_abs_diff == Some(0.0)));
    }

    #[test]
    fn one_nan_fails_the_tensor_that_holds_it() {
        let mut r = reference();
        r.insert(
            "student_logits".into(),
            t(&[1.0, f32::NAN, 3.0, 0.5], &[1, 2, 2]),
        );
        assert_eq!(
            failures(&r),
            [(
                "student_logits".to_string(),
                Failure::NonFinite {
                    count: 1,
                    first_index: 1,
                    in_reference: false
                }
            )]
        );
        // An infinity too, and in the reference as well as in the result.
        let mut r = reference();
        r.insert("loss_total".into(), t(&[f32::INFINITY], &[1]));
        assert!(matches!(failures(&r)[0].1, Failure::NonFinite { .. }));
        let checks = compare("cpu", &r, &reference(), true, cpu_rule).unwrap();
        assert!(checks.iter().any(|c| matches!(
            c.failure,
            Some(Failure::NonFinite {
                in_reference: true,
                ..
            })
        )));
    }

    #[test]
    fn a_missing_gradient_fails_as_missing_and_an_extra_tensor_as_extra() {
        let mut r = reference();
        r.remove("grad.wte.weight");
        assert_eq!(
            failures(&r),
            [("grad.wte.weight".to_string(), Failure::Missing)]
        );
        let mut r = reference();
        r.insert("grad.h.0.ln_1.weight".into(), t(&[1.0], &[1]));
        assert_eq!(
            failures(&r),
            [("grad.h.0.ln_1.weight".to_string(), Failure::Extra)]
        );
        // Against the golden file, tensors it does not have are not failures.
        let checks = compare("golden", &reference(), &r, false, cpu_rule).unwrap();
        assert!(checks.iter().all(|c| c.ok));
    }

    #[test]
    fn a_wrong_shape_fails_even_with_the_same_values() {
        let mut r = reference();
        r.insert("student_logits".into(), t(&[1.0, -2.0, 3.0, 0.5], &[2, 2]));
        assert_eq!(
            failures(&r),
            [(
                "student_logits".to_string(),
                Failure::Shape {
                    expected: vec![1, 2, 2],
                    got: vec![2, 2]
                }
            )]
        );
    }

    #[test]
    fn a_difference_beyond_tolerance_names_the_worst_element() {
        let mut r = reference();
        // Logits: 1e-4 relative + 1e-5: 3.0 may move by 3.1e-4, not by 1e-3.
        r.insert(
            "student_logits".into(),
            t(&[1.0, -2.0, 3.001, 0.50002], &[1, 2, 2]),
        );
        let f = failures(&r);
        assert_eq!(f.len(), 1);
        match &f[0].1 {
            Failure::Tolerance {
                index,
                max_abs_diff,
                ..
            } => {
                assert_eq!(*index, 2);
                assert!((max_abs_diff - 1e-3).abs() < 1e-5, "{max_abs_diff}");
            }
            other => panic!("{other:?}"),
        }
        // Within tolerance passes.
        r.insert(
            "student_logits".into(),
            t(&[1.0, -2.0, 3.0002, 0.5], &[1, 2, 2]),
        );
        assert!(failures(&r).is_empty());
    }

    #[test]
    fn golden_labels_are_compared_only_where_the_score_is_positive() {
        let golden = Tensors::from([
            ("labels".to_string(), t(&[5.0, 7.0, 1.0, 2.0], &[1, 1, 4])),
            ("label_scores".into(), t(&[0.3, 0.1, 0.0, 0.0], &[1, 1, 4])),
        ]);
        let rule = golden_rule(&golden).unwrap();
        // Ties (score 0) may pick any index; the positive slots must match.
        let mut r = golden.clone();
        r.insert("labels".into(), t(&[5.0, 7.0, 2.0, 9.0], &[1, 1, 4]));
        assert!(compare("golden", &golden, &r, false, &rule)
            .unwrap()
            .iter()
            .all(|c| c.ok));
        r.insert("labels".into(), t(&[5.0, 8.0, 1.0, 2.0], &[1, 1, 4]));
        let checks = compare("golden", &golden, &r, false, &rule).unwrap();
        let bad: Vec<&str> = checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.tensor.as_str())
            .collect();
        assert_eq!(bad, ["labels"]);
    }

    #[test]
    fn the_golden_batch_matches_on_the_cpu() {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden");
        let report = run_parity(&dir, &Device::Cpu).unwrap();
        assert!(report.passed(), "{:?}", report.failed);
        let golden = load_golden(&dir).unwrap();
        for name in golden.keys() {
            assert!(
                report
                    .tensors
                    .iter()
                    .any(|c| &c.tensor == name && c.against == "golden"),
                "{name} compared with the golden file"
            );
        }
    }
}
