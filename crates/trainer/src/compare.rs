//! Comparing objectives over seeds: mean ± std of the final validation loss, the paired
//! difference to NTP with a 95% interval, validation curves with a band over seeds, the
//! paper's token-efficiency figure, throughput; written as `compare.{md,json,png}`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::report::{human_count, plot_bands, Band};
use crate::run::{read_metrics, TrainOutcome};
use crate::{Arm, Error, Objective, Result};

/// One finished run of a comparison and its validation curve.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    pub arm: String,
    pub objective: Objective,
    pub seed: u64,
    pub outcome: TrainOutcome,
    /// `(tokens, validation loss)` at each evaluation.
    pub curve: Vec<(f64, f64)>,
    pub dir: PathBuf,
}

impl RunRecord {
    /// The record of the run in `dir`, its curve read from `metrics.jsonl`.
    pub fn read(arm: Arm, seed: u64, outcome: TrainOutcome, dir: &Path) -> Result<Self> {
        let curve = read_metrics(dir)?
            .iter()
            .filter_map(|m| m.val_loss.map(|v| (m.tokens as f64, v)))
            .collect();
        Ok(Self {
            arm: arm.to_string(),
            objective: arm.objective,
            seed,
            outcome,
            curve,
            dir: dir.to_path_buf(),
        })
    }
}

/// Mean and sample standard deviation (0 for a single value).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The two-sided 95% quantile of Student's t with `df` degrees of freedom (t₀.₉₇₅), from the
/// standard table; 1.96 (the normal quantile) beyond 30.
pub fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => T[df - 1],
        _ => 1.96,
    }
}

/// A paired difference over seeds: its mean and the half-width of the 95% t-interval
/// (NaN with a single seed).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PairedDiff {
    pub mean: f64,
    pub half_width: f64,
    pub seeds: usize,
}

impl PairedDiff {
    /// `xs[i] − ys[i]` over paired seeds.
    pub fn of(xs: &[f64], ys: &[f64]) -> Self {
        let d: Vec<f64> = xs.iter().zip(ys).map(|(x, y)| x - y).collect();
        let (mean, sd) = mean_std(&d);
        let n = d.len();
        Self {
            mean,
            half_width: t975(n.saturating_sub(1)) * sd / (n as f64).sqrt(),
            seeds: n,
        }
    }

    /// Whether the interval excludes 0.
    pub fn significant(&self) -> bool {
        self.half_width.is_finite() && self.mean.abs() > self.half_width
    }
}

/// The tokens at which a validation curve first reaches `target` (linear interpolation
/// between evaluations), `None` when it never does.
pub fn tokens_to_reach(curve: &[(f64, f64)], target: f64) -> Option<f64> {
    let i = curve.iter().position(|&(_, l)| l <= target)?;
    if i == 0 {
        return Some(curve[0].0);
    }
    let ((x0, l0), (x1, l1)) = (curve[i - 1], curve[i]);
    Some(x0 + (l0 - target) / (l0 - l1) * (x1 - x0))
}

/// The mean curve over runs evaluated at the same token counts (the shortest run bounds it).
fn mean_curve(curves: &[&[(f64, f64)]]) -> Vec<(f64, f64, f64, f64)> {
    let n = curves.iter().map(|c| c.len()).min().unwrap_or(0);
    (0..n)
        .map(|i| {
            let ys: Vec<f64> = curves.iter().map(|c| c[i].1).collect();
            let (m, _) = mean_std(&ys);
            let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (curves[0][i].0, m, lo, hi)
        })
        .collect()
}

/// One arm's summary over seeds.
#[derive(Clone, Debug, Serialize)]
pub struct ArmSummary {
    pub arm: String,
    pub objective: Objective,
    pub params: usize,
    pub seeds: Vec<u64>,
    pub val_loss: Vec<f64>,
    pub val_loss_mean: f64,
    pub val_loss_std: f64,
    pub val_ppl_mean: f64,
    pub val_ppl_std: f64,
    /// Paired difference of the final validation loss to NTP over common seeds.
    pub vs_ntp: Option<PairedDiff>,
    /// Fraction of NTP's tokens this arm's mean curve needs to reach NTP's mean final
    /// validation loss (`None`: it never does).
    pub tokens_to_ntp_loss: Option<f64>,
    pub tokens_per_s: f64,
    pub wall_s: f64,
    /// Mean validation curve: `(tokens, mean, min, max)` over seeds.
    pub curve: Vec<(f64, f64, f64, f64)>,
}

/// The comparison of every arm, in the order the runs were given.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub title: String,
    pub notes: String,
    pub arms: Vec<ArmSummary>,
    pub runs: Vec<RunRecord>,
}

impl Comparison {
    /// Summarises runs by arm (first-seen order).
    pub fn new(title: &str, notes: &str, runs: &[RunRecord]) -> Result<Self> {
        if runs.is_empty() {
            return Err(Error::Other("nothing to compare: no finished run".into()));
        }
        let mut order: Vec<&str> = Vec::new();
        let mut by_arm: BTreeMap<&str, Vec<&RunRecord>> = BTreeMap::new();
        for r in runs {
            if !by_arm.contains_key(r.arm.as_str()) {
                order.push(&r.arm);
            }
            by_arm.entry(&r.arm).or_default().push(r);
        }
        let final_loss = |rs: &[&RunRecord]| -> BTreeMap<u64, f64> {
            rs.iter().map(|r| (r.seed, r.outcome.val_loss)).collect()
        };
        let ntp = by_arm.get(Objective::Ntp.name()).map(|rs| final_loss(rs));
        let ntp_target = ntp
            .as_ref()
            .map(|m| mean_std(&m.values().copied().collect::<Vec<_>>()));
        let ntp_tokens = by_arm
            .get(Objective::Ntp.name())
            .and_then(|rs| rs.first())
            .map(|r| r.outcome.tokens as f64);
        let arms = order
            .iter()
            .map(|name| {
                let rs = &by_arm[name];
                let losses: Vec<f64> = rs.iter().map(|r| r.outcome.val_loss).collect();
                let ppls: Vec<f64> = losses.iter().map(|l| l.exp()).collect();
                let (lm, ls) = mean_std(&losses);
                let (pm, ps) = mean_std(&ppls);
                let vs_ntp = ntp.as_ref().and_then(|n| {
                    let (a, b): (Vec<f64>, Vec<f64>) = rs
                        .iter()
                        .filter_map(|r| n.get(&r.seed).map(|x| (r.outcome.val_loss, *x)))
                        .unzip();
                    (!a.is_empty() && rs[0].objective != Objective::Ntp)
                        .then(|| PairedDiff::of(&a, &b))
                });
                let cs: Vec<&[(f64, f64)]> = rs.iter().map(|r| r.curve.as_slice()).collect();
                let curve = mean_curve(&cs);
                let mean_only: Vec<(f64, f64)> = curve.iter().map(|p| (p.0, p.1)).collect();
                let tokens_to_ntp_loss = match (ntp_target, ntp_tokens) {
                    (Some((target, _)), Some(total)) => {
                        tokens_to_reach(&mean_only, target).map(|t| t / total)
                    }
                    _ => None,
                };
                ArmSummary {
                    arm: name.to_string(),
                    objective: rs[0].objective,
                    params: rs[0].outcome.params,
                    seeds: rs.iter().map(|r| r.seed).collect(),
                    val_loss: losses.clone(),
                    val_loss_mean: lm,
                    val_loss_std: ls,
                    val_ppl_mean: pm,
                    val_ppl_std: ps,
                    vs_ntp,
                    tokens_to_ntp_loss,
                    tokens_per_s: mean_std(
                        &rs.iter()
                            .map(|r| r.outcome.tokens_per_s)
                            .collect::<Vec<_>>(),
                    )
                    .0,
                    wall_s: mean_std(&rs.iter().map(|r| r.outcome.wall_s).collect::<Vec<_>>()).0,
                    curve,
                }
            })
            .collect();
        Ok(Self {
            title: title.to_string(),
            notes: notes.to_string(),
            arms,
            runs: runs.to_vec(),
        })
    }

    /// The one-line verdict on CoCoMix against NTP, or `None` without both.
    pub fn verdict(&self) -> Option<String> {
        let c = self
            .arms
            .iter()
            .find(|a| a.objective == Objective::Cocomix && a.vs_ntp.is_some())?;
        let d = c.vs_ntp?;
        let how = if d.seeds < 2 {
            "one seed: no error bar, no verdict on significance".to_string()
        } else if d.significant() && d.mean < 0.0 {
            "CoCoMix is better than NTP beyond seed noise".to_string()
        } else if d.significant() {
            "CoCoMix is worse than NTP beyond seed noise".to_string()
        } else {
            "the difference is within seed noise".to_string()
        };
        Some(format!(
            "{}: CoCoMix − NTP final validation loss {:+.4} ± {:.4} nats (95% interval over {} seeds): {how}.",
            c.arm, d.mean, d.half_width, d.seeds
        ))
    }

    /// The markdown report.
    pub fn markdown(&self) -> String {
        let mut md = format!("# {}\n\n{}\n\n", self.title, self.notes);
        if let Some(v) = self.verdict() {
            md += &format!("**Verdict.** {v}\n\n");
        }
        md += "| objective | params | seeds | val loss (mean ± std) | val PPL (mean ± std) | Δ loss vs NTP (95% CI) | tokens to NTP's loss | train tokens/s | wall (s) |\n|---|---|---|---|---|---|---|---|---|\n";
        for a in &self.arms {
            let pm = |m: f64, s: f64, n: usize| {
                if n > 1 {
                    format!("{m:.4} ± {s:.4}")
                } else {
                    format!("{m:.4}")
                }
            };
            let vs = match a.vs_ntp {
                None => "–".to_string(),
                Some(d) if d.seeds < 2 => format!("{:+.4}", d.mean),
                Some(d) => format!(
                    "{:+.4} [{:+.4}, {:+.4}]{}",
                    d.mean,
                    d.mean - d.half_width,
                    d.mean + d.half_width,
                    if d.significant() { " *" } else { "" }
                ),
            };
            let eff = match (a.objective, a.tokens_to_ntp_loss) {
                (Objective::Ntp, _) => "1.00".to_string(),
                (_, Some(f)) => format!("{f:.2}"),
                (_, None) => "not reached".to_string(),
            };
            md += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} |\n",
                a.arm,
                human_count(a.params as f64),
                a.seeds.len(),
                pm(a.val_loss_mean, a.val_loss_std, a.seeds.len()),
                pm(a.val_ppl_mean, a.val_ppl_std, a.seeds.len()),
                vs,
                eff,
                a.tokens_per_s,
                a.wall_s
            );
        }
        md += "\nΔ: paired by seed (same batches); * marks an interval that excludes 0. \
               Tokens to NTP's loss: the fraction of NTP's training tokens the objective's \
               mean validation curve needs to reach NTP's mean final validation loss (the \
               paper's token-efficiency figure; linear interpolation between evaluations).\n\n";
        md += "| objective | seed | val loss | val PPL | run |\n|---|---|---|---|---|\n";
        for r in &self.runs {
            md += &format!(
                "| {} | {} | {:.4} | {:.2} | `{}` |\n",
                r.arm,
                r.seed,
                r.outcome.val_loss,
                r.outcome.val_ppl,
                r.dir.display()
            );
        }
        md += "\n![validation loss](compare.png)\n";
        md
    }
}

/// Writes `compare.md`, `compare.json` and `compare.png` into `dir`.
pub fn write_report(
    dir: &Path,
    title: &str,
    runs: &[RunRecord],
    notes: &str,
) -> Result<Comparison> {
    let c = Comparison::new(title, notes, runs)?;
    let bands: Vec<Band> = c
        .arms
        .iter()
        .map(|a| Band {
            name: format!(
                "{} ({} seed{})",
                a.arm,
                a.seeds.len(),
                if a.seeds.len() == 1 { "" } else { "s" }
            ),
            points: a.curve.clone(),
        })
        .collect();
    plot_bands(
        &dir.join("compare.png"),
        &format!("{title}: validation loss (mean, band = min–max over seeds)"),
        "training tokens",
        "validation loss (nats)",
        &bands,
    )?;
    cocomix_data::write_atomic(&dir.join("compare.md"), c.markdown().as_bytes())?;
    let json = serde_json::to_string_pretty(&c).map_err(|e| Error::Other(e.to_string()))?;
    cocomix_data::write_atomic(&dir.join("compare.json"), json.as_bytes())?;
    Ok(c)
}
