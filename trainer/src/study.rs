//! The step-matching study (the MoT paper's headline measure): dense, MoT and optionally MoE-4x
//! trained on the same data, seed and steps, the held-out split evaluated on the same batches
//! at regular intervals, and per modality the step at which each challenger first reaches
//! dense's final held-out loss (linearly interpolated between evaluations), as a fraction of
//! dense's steps. Several seeds give a spread. `motley study` prints the table, `--json` the
//! [`StudyReport`], and the run directory gets `study.json` and `study.png`.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use motley_shards::{Modality, Split};

use crate::error::TrainError;
use crate::loader::open_source;
use crate::metrics::{EvalRecord, ensure_font, write_png};
use crate::model::Arch;
use crate::train::{Trainer, prepare_run_dir};

/// Version tag of the JSON report; bump when a field changes meaning or disappears.
pub const SCHEMA: &str = "motley.study/1";

/// The held-out curves the study compares: next-token loss on text, image and speech targets,
/// and (Transfusion setting) the diffusion loss of latent images.
pub const CURVES: [&str; 4] = ["text", "image", "speech", "diffusion"];

/// The paper's step-matching fractions printed beside ours: (architecture, curve, model size,
/// fraction of dense's steps). Chameleon setting, held-out loss, except speech (7B, training
/// loss); the paper gives MoE-4x only at 7B, where it never reaches dense's image loss.
pub const PAPER: [(Arch, &str, &str, f64); 5] = [
    (Arch::Mot, "text", "37M", 0.546),
    (Arch::Mot, "image", "37M", 0.260),
    (Arch::Mot, "speech", "7B", 0.229),
    (Arch::Moe, "text", "7B", 0.635),
    (Arch::Moe, "image", "7B", 1.012),
];

/// One held-out evaluation of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: u64,
    pub text: Option<f64>,
    pub image: Option<f64>,
    pub speech: Option<f64>,
    pub diffusion: Option<f64>,
}

impl EvalPoint {
    pub fn new(step: u64, r: &EvalRecord) -> Self {
        EvalPoint { step, text: r.text, image: r.image, speech: r.speech, diffusion: r.diffusion }
    }

    /// The value of curve `c` (an index into [`CURVES`]).
    pub fn get(&self, c: usize) -> Option<f64> {
        [self.text, self.image, self.speech, self.diffusion].get(c).copied().flatten().filter(|v| v.is_finite())
    }
}

/// One trained run: its architecture, seed and held-out curve (step 0 included).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyRun {
    pub arch: Arch,
    pub seed: u64,
    pub steps: u64,
    pub params: i64,
    pub wall_s: f64,
    pub run_dir: PathBuf,
    pub curve: Vec<EvalPoint>,
}

impl StudyRun {
    /// `(step, loss)` of curve `c`, in step order.
    pub fn series(&self, c: usize) -> Vec<(f64, f64)> {
        self.curve.iter().filter_map(|p| p.get(c).map(|v| (p.step as f64, v))).collect()
    }
}

/// Mean, minimum and maximum over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// How many values (seeds) it summarizes.
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        let n = values.len();
        let (min, max) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        Some(Spread { mean: values.iter().sum::<f64>() / n as f64, min, max, n })
    }
}

/// One seed's match of one challenger against dense on one curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedMatch {
    pub seed: u64,
    /// Dense's held-out loss at its last evaluation (its final step): the target.
    pub dense_final: f64,
    pub dense_steps: u64,
    /// The challenger's own held-out loss at the same final step.
    pub final_loss: Option<f64>,
    /// First step at which the challenger's curve reaches the target (interpolated); None
    /// when it never does within its steps.
    pub step: Option<f64>,
    /// `step / dense_steps`.
    pub fraction: Option<f64>,
}

/// The paper's figure for the same architecture and curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaperFraction {
    /// Model size it was measured at (`37M`, `7B`).
    pub size: String,
    pub fraction: f64,
}

/// One challenger on one curve, over all seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Match {
    pub curve: String,
    pub arch: Arch,
    pub per_seed: Vec<SeedMatch>,
    /// Seeds whose challenger reached dense's final loss.
    pub reached: usize,
    pub seeds: usize,
    pub dense_final: Option<Spread>,
    pub final_loss: Option<Spread>,
    /// Over the seeds that reached the target only.
    pub step: Option<Spread>,
    pub fraction: Option<Spread>,
    pub paper: Option<PaperFraction>,
}

/// What share of the input positions each modality takes in the training stream: whether
/// the mix gives every modality signal. Latent image patches count as image positions; BOI,
/// EOI and the other specials as text; padding not at all.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PositionShares {
    pub text: f64,
    pub image: f64,
    pub speech: f64,
    /// Batches counted (the first of the first seed's stream).
    pub batches: u64,
}

/// Batches [`position_shares`] counts.
pub const SHARE_BATCHES: u64 = 32;

/// Counts the input modality of every position in the first `batches` batches of the
/// training stream `cfg` describes (a fresh stream: no run is disturbed).
pub fn position_shares(cfg: &TrainConfig, batches: u64) -> Result<PositionShares, TrainError> {
    let mut src = open_source(&cfg.data, cfg.train.seed, Split::Train, 0, 1)?
        .ok_or_else(|| TrainError::Data { path: "data".into(), msg: "no training split".into() })?;
    // Padding (a segment moved whole to the next row leaves the rest of its row as PAD) is
    // no one's signal.
    let pad = src.vocab().special("pad");
    let mut counts = [0u64; Modality::COUNT];
    for _ in 0..batches {
        let b = src.next_batch()?;
        for (&id, &m) in b.inputs.iter().zip(&b.modality) {
            if Some(id) != pad
                && let Some(c) = counts.get_mut(usize::from(m))
            {
                *c += 1;
            }
        }
    }
    let total = counts.iter().sum::<u64>().max(1) as f64;
    Ok(PositionShares {
        text: counts[0] as f64 / total,
        image: counts[1] as f64 / total,
        speech: counts[2] as f64 / total,
        batches,
    })
}

/// Everything `motley study` measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyReport {
    pub schema: String,
    pub preset: String,
    /// Input positions per modality in the training mix.
    pub positions: PositionShares,
    pub steps: u64,
    pub eval_every: u64,
    pub eval_batches: u64,
    pub seeds: Vec<u64>,
    pub archs: Vec<Arch>,
    pub matches: Vec<Match>,
    pub runs: Vec<StudyRun>,
    /// `study.png` in the study directory.
    pub plot: Option<PathBuf>,
}

/// The first step at which `points` (step-ordered `(step, loss)`) reaches `target` or below,
/// linearly interpolated between the two evaluations that bracket the crossing; None if it
/// never does.
pub fn first_reach(points: &[(f64, f64)], target: f64) -> Option<f64> {
    let mut prev: Option<(f64, f64)> = None;
    for &(s, l) in points {
        if l <= target {
            return Some(match prev {
                Some((s0, l0)) if l0 > l => s0 + (l0 - target) / (l0 - l) * (s - s0),
                _ => s,
            });
        }
        prev = Some((s, l));
    }
    None
}

/// Matches every challenger in `runs` against the dense run of the same seed, per curve.
pub fn match_runs(runs: &[StudyRun], archs: &[Arch], seeds: &[u64]) -> Vec<Match> {
    let mut out = Vec::new();
    for (c, name) in CURVES.iter().enumerate() {
        for &arch in archs.iter().filter(|&&a| a != Arch::Dense) {
            let mut per_seed = Vec::new();
            for &seed in seeds {
                let find = |a: Arch| runs.iter().find(|r| r.arch == a && r.seed == seed);
                let (Some(dense), Some(ch)) = (find(Arch::Dense), find(arch)) else { continue };
                let d = dense.series(c);
                let Some(&(_, dense_final)) = d.last() else { continue };
                let series = ch.series(c);
                let step = first_reach(&series, dense_final);
                per_seed.push(SeedMatch {
                    seed,
                    dense_final,
                    dense_steps: dense.steps,
                    final_loss: series.last().map(|p| p.1),
                    step,
                    fraction: step.map(|s| s / dense.steps.max(1) as f64),
                });
            }
            if per_seed.is_empty() {
                continue;
            }
            let collect = |f: &dyn Fn(&SeedMatch) -> Option<f64>| per_seed.iter().filter_map(f).collect::<Vec<_>>();
            let paper = PAPER
                .iter()
                .find(|p| p.0 == arch && p.1 == *name)
                .map(|p| PaperFraction { size: p.2.to_string(), fraction: p.3 });
            out.push(Match {
                curve: name.to_string(),
                arch,
                reached: per_seed.iter().filter(|m| m.step.is_some()).count(),
                seeds: per_seed.len(),
                dense_final: Spread::of(&collect(&|m| Some(m.dense_final))),
                final_loss: Spread::of(&collect(&|m| m.final_loss)),
                step: Spread::of(&collect(&|m| m.step)),
                fraction: Spread::of(&collect(&|m| m.fraction)),
                paper,
                per_seed,
            });
        }
    }
    out
}

/// How the study runs.
#[derive(Debug, Clone)]
pub struct StudyOptions {
    /// Training seeds (model init and data order); one run per seed and architecture.
    pub seeds: Vec<u64>,
    /// Dense first; then the challengers (MoT, MoE).
    pub archs: Vec<Arch>,
    pub overwrite: bool,
    /// Progress and every run's console lines on stderr.
    pub verbose: bool,
}

/// Trains every architecture of `opts` for every seed from `base` in `out/seed-<s>/<arch>`,
/// evaluating before the first step and every `train.eval_every` steps, and writes
/// `out/study.json` and `out/study.png`.
pub fn run_study(base: &TrainConfig, out: &Path, opts: &StudyOptions) -> Result<StudyReport, TrainError> {
    let bad = |path: &str, msg: String| Err(TrainError::Config { path: path.into(), msg });
    if base.data.eval_fraction <= 0.0 {
        return bad("data.eval_fraction", "the study compares held-out losses; hold some documents out (> 0)".into());
    }
    if base.train.eval_every == 0 || base.train.eval_every > base.train.steps {
        return bad(
            "train.eval_every",
            format!("must be between 1 and train.steps ({}) to give a curve", base.train.steps),
        );
    }
    if opts.archs.first() != Some(&Arch::Dense) || opts.archs.len() < 2 {
        return bad("archs", "dense first, then at least one of mot, moe".into());
    }
    if opts.seeds.is_empty() {
        return bad("seeds", "at least one seed".into());
    }
    std::fs::create_dir_all(out).map_err(TrainError::io("create study dir", out))?;
    let mut first = base.clone();
    first.train.seed = opts.seeds[0];
    let positions = position_shares(&first, SHARE_BATCHES)?;
    if opts.verbose {
        eprintln!(
            "study: the training mix is {:.1}% text, {:.1}% image, {:.1}% speech positions (first {} batches)",
            100.0 * positions.text,
            100.0 * positions.image,
            100.0 * positions.speech,
            positions.batches
        );
    }
    let total = opts.seeds.len() * opts.archs.len();
    let mut runs = Vec::with_capacity(total);
    for (i, &seed) in opts.seeds.iter().enumerate() {
        for (j, &arch) in opts.archs.iter().enumerate() {
            let mut cfg = base.clone();
            cfg.model.arch = arch;
            cfg.train.seed = seed;
            let dir = out.join(format!("seed-{seed}")).join(arch.to_string());
            if opts.verbose {
                eprintln!(
                    "study: run {}/{total}: {arch}, seed {seed}, {} steps -> {}",
                    i * opts.archs.len() + j + 1,
                    cfg.train.steps,
                    dir.display()
                );
            }
            prepare_run_dir(&dir, opts.overwrite)?;
            let mut t = Trainer::new(cfg)?;
            t.verbose = opts.verbose;
            t.attach_run_dir(&dir)?;
            // The untrained model's loss anchors the curve, so a match before the first
            // evaluation still interpolates from something measured.
            let mut curve: Vec<EvalPoint> = t.evaluate()?.iter().map(|r| EvalPoint::new(0, r)).collect();
            let summary = t.run()?;
            curve.extend(t.records().iter().filter_map(|r| r.eval.as_ref().map(|e| EvalPoint::new(r.step, e))));
            runs.push(StudyRun {
                arch,
                seed,
                steps: summary.steps,
                params: summary.params,
                wall_s: summary.wall_s,
                run_dir: dir,
                curve,
            });
        }
    }
    let mut report = StudyReport {
        schema: SCHEMA.into(),
        preset: base.preset.clone(),
        positions,
        steps: base.train.steps,
        eval_every: base.train.eval_every,
        eval_batches: base.train.eval_batches,
        seeds: opts.seeds.clone(),
        archs: opts.archs.clone(),
        matches: match_runs(&runs, &opts.archs, &opts.seeds),
        runs,
        plot: None,
    };
    let plot = out.join("study.png");
    plot_study(&report, &plot, &plot_title(&report))?;
    report.plot = Some(plot);
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| TrainError::Data { path: out.join("study.json").display().to_string(), msg: e.to_string() })?;
    // Written whole, then renamed: a reader never sees half a report.
    let (path, tmp) = (out.join("study.json"), out.join("study.json.tmp"));
    std::fs::write(&tmp, json).map_err(TrainError::io("write study report", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(TrainError::io("rename study report", &path))?;
    Ok(report)
}

fn plot_title(r: &StudyReport) -> String {
    format!("{} preset, {} steps, {} seed(s)", r.preset, r.steps, r.seeds.len())
}

/// The report of the finished study in `out` (`study.json`), with `study.png` redrawn from it:
/// a study's table and plot without training again.
pub fn reload_study(out: &Path) -> Result<StudyReport, TrainError> {
    let path = out.join("study.json");
    let text = std::fs::read_to_string(&path).map_err(TrainError::io("read study report", &path))?;
    let bad = |msg: String| TrainError::Data { path: path.display().to_string(), msg };
    let mut report: StudyReport = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if report.schema != SCHEMA {
        return Err(bad(format!("schema `{}`, expected `{SCHEMA}`", report.schema)));
    }
    let plot = out.join("study.png");
    plot_study(&report, &plot, &plot_title(&report))?;
    report.plot = Some(plot);
    Ok(report)
}

fn fmt_spread(s: Option<Spread>, prec: usize) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.n > 1 => format!("{:.p$} [{:.p$}-{:.p$}]", s.mean, s.min, s.max, p = prec),
        Some(s) => format!("{:.p$}", s.mean, p = prec),
    }
}

impl StudyReport {
    /// The study's table: per curve, dense's final held-out loss and, per challenger, the step
    /// at which it reaches that loss, that step as a fraction of dense's, its own final loss,
    /// and the paper's fraction. Several seeds print `mean [min-max]`.
    pub fn table(&self) -> String {
        let mut s = format!(
            "step matching: the step at which each architecture first reaches dense's final held-out loss\n\
             (linear between evaluations every {} steps; {} steps; seeds {}; mean [min-max] over seeds)\n",
            self.eval_every,
            self.steps,
            self.seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
        );
        let p = &self.positions;
        s.push_str(&format!(
            "training mix: {:.1}% text, {:.1}% image, {:.1}% speech positions\n",
            100.0 * p.text,
            100.0 * p.image,
            100.0 * p.speech
        ));
        s.push_str(&format!(
            "{:<10} {:<6} {:>26} {:>24} {:>26} {:>26}  {}\n",
            "curve", "arch", "dense final loss", "step reached", "fraction of dense steps", "own final loss", "paper"
        ));
        for m in &self.matches {
            let reached = if m.reached == m.seeds {
                String::new()
            } else if m.reached == 0 {
                "not reached (> 1)".into()
            } else {
                format!("(reached in {}/{} seeds)", m.reached, m.seeds)
            };
            let step = if m.reached == 0 { "-".into() } else { fmt_spread(m.step, 1) };
            let frac =
                if m.reached == 0 { reached.clone() } else { format!("{} {reached}", fmt_spread(m.fraction, 3)) };
            let paper = m.paper.as_ref().map_or(String::new(), |p| format!("{:.3} ({})", p.fraction, p.size));
            s.push_str(&format!(
                "{:<10} {:<6} {:>26} {:>24} {:>26} {:>26}  {}\n",
                m.curve,
                m.arch.to_string(),
                fmt_spread(m.dense_final, 4),
                step,
                frac.trim(),
                fmt_spread(m.final_loss, 4),
                paper
            ));
        }
        for r in &self.runs {
            s.push_str(&format!(
                "{} seed {}: {} steps, {} parameters, {:.1}s ({})\n",
                r.arch,
                r.seed,
                r.steps,
                r.params,
                r.wall_s,
                r.run_dir.display()
            ));
        }
        if let Some(p) = &self.plot {
            s.push_str(&format!("plot: {}\n", p.display()));
        }
        s
    }
}

fn arch_color(a: Arch) -> RGBColor {
    match a {
        Arch::Dense => RGBColor(60, 60, 60),
        Arch::Mot => RGBColor(214, 39, 40),
        Arch::Moe => RGBColor(31, 119, 180),
    }
}

/// Per curve, one panel: each architecture's held-out loss against steps (mean over seeds,
/// the band between the lowest and highest seed; from a tenth of the steps on), dense's final loss as a dashed
/// line, and each challenger's matching step marked on it (a dot at the mean, a bar over the
/// seeds that reached it).
pub fn plot_study(report: &StudyReport, path: &Path, title: &str) -> Result<(), TrainError> {
    ensure_font();
    let err = |e: String| TrainError::Plot { path: path.to_path_buf(), msg: e };
    let curves: Vec<usize> =
        (0..CURVES.len()).filter(|&c| report.runs.iter().any(|r| !r.series(c).is_empty())).collect();
    let panels = curves.len().max(1);
    write_png(path, (440 * panels as u32, 480), |root| {
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(|e| err(e.to_string()))?;
        let areas = root.split_evenly((1, panels));
        for (&c, area) in curves.iter().zip(&areas) {
            // The first tenth of training falls from the untrained loss (several times the
            // final one); the panel starts at the first evaluation after it, so the part where
            // the curves approach dense's final loss fills the height.
            let x0 = report
                .runs
                .iter()
                .flat_map(|r| r.curve.iter().map(|p| p.step))
                .filter(|&s| s > 0 && s * 10 >= report.steps)
                .min()
                .unwrap_or(report.eval_every.max(1)) as f64;
            let later = |r: &StudyRun| r.series(c).into_iter().filter(|p| p.0 >= x0).collect::<Vec<_>>();
            let values: Vec<f64> = report.runs.iter().flat_map(|r| later(r).into_iter().map(|p| p.1)).collect();
            let (lo, hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
            if !lo.is_finite() {
                continue;
            }
            let pad = ((hi - lo) * 0.05).max(1e-3);
            let x1 = (report.steps as f64).max(x0 + 1.0);
            let mut chart = ChartBuilder::on(area)
                .caption(format!("{} (held-out)", CURVES[c]), ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(32)
                .y_label_area_size(52)
                .build_cartesian_2d(x0..x1, (lo - pad)..(hi + pad))
                .map_err(|e| err(e.to_string()))?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc("loss")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.2}"))
                .light_line_style(WHITE)
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(|e| err(e.to_string()))?;
            for &arch in &report.archs {
                let color = arch_color(arch);
                let runs: Vec<Vec<(f64, f64)>> =
                    report.runs.iter().filter(|r| r.arch == arch).map(later).filter(|s| !s.is_empty()).collect();
                // Seeds share the evaluation steps; take the steps every seed has.
                let Some(first) = runs.first() else { continue };
                let band: Vec<(f64, f64, f64, f64)> = first
                    .iter()
                    .filter_map(|&(step, _)| {
                        let v: Vec<f64> =
                            runs.iter().filter_map(|s| s.iter().find(|p| p.0 == step).map(|p| p.1)).collect();
                        (v.len() == runs.len())
                            .then(|| Spread::of(&v))
                            .flatten()
                            .map(|sp| (step, sp.mean, sp.min, sp.max))
                    })
                    .collect();
                if runs.len() > 1 {
                    let mut poly: Vec<(f64, f64)> = band.iter().map(|b| (b.0, b.3)).collect();
                    poly.extend(band.iter().rev().map(|b| (b.0, b.2)));
                    chart
                        .draw_series(std::iter::once(Polygon::new(poly, color.mix(0.18).filled())))
                        .map_err(|e| err(e.to_string()))?;
                }
                chart
                    .draw_series(LineSeries::new(band.iter().map(|b| (b.0, b.1)), color.stroke_width(2)))
                    .map_err(|e| err(e.to_string()))?
                    .label(arch.to_string())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            }
            // Dense's final loss (mean over seeds) and where each challenger reaches it.
            let target =
                report.matches.iter().find(|m| m.curve == CURVES[c]).and_then(|m| m.dense_final).map(|s| s.mean);
            if let Some(y) = target {
                let grey = arch_color(Arch::Dense);
                chart
                    .draw_series(DashedLineSeries::new([(x0, y), (x1, y)], 6, 4, grey.stroke_width(1)))
                    .map_err(|e| err(e.to_string()))?;
            }
            for m in report.matches.iter().filter(|m| m.curve == CURVES[c]) {
                let (Some(step), Some(frac), Some(y)) = (m.step, m.fraction, m.dense_final.map(|s| s.mean)) else {
                    continue;
                };
                let color = arch_color(m.arch);
                let (a, b) = (step.min.max(x0), step.max.max(x0));
                chart
                    .draw_series(std::iter::once(PathElement::new(vec![(a, y), (b, y)], color.stroke_width(3))))
                    .map_err(|e| err(e.to_string()))?;
                chart
                    .draw_series(std::iter::once(Circle::new((step.mean.max(x0), y), 6, color.filled())))
                    .map_err(|e| err(e.to_string()))?
                    .label(if m.reached == m.seeds {
                        format!("{} reaches dense at {:.2}", m.arch, frac.mean)
                    } else {
                        format!("{} reaches dense at {:.2} ({}/{} seeds)", m.arch, frac.mean, m.reached, m.seeds)
                    })
                    .legend(move |(x, y)| Circle::new((x + 9, y), 5, color.filled()));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(|e| err(e.to_string()))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reach_interpolates_between_evaluations() {
        let curve = [(0.0, 8.0), (10.0, 5.0), (20.0, 4.0), (30.0, 3.0), (40.0, 2.5)];
        // 3.5 lies halfway between the evaluations at 20 (4.0) and 30 (3.0).
        assert_eq!(first_reach(&curve, 3.5), Some(25.0));
        // A quarter of the way from 10 (5.0) to 20 (4.0).
        assert_eq!(first_reach(&curve, 4.75), Some(12.5));
        // Exactly on an evaluation.
        assert_eq!(first_reach(&curve, 3.0), Some(30.0));
        // Already there at the first point.
        assert_eq!(first_reach(&curve, 9.0), Some(0.0));
        assert_eq!(first_reach(&curve, 2.0), None);
        assert_eq!(first_reach(&[], 2.0), None);
        // Non-monotone: the first crossing counts, not a later one, and a rise before it
        // interpolates from the evaluation just before the crossing.
        let bumpy = [(0.0, 8.0), (10.0, 3.8), (20.0, 4.4), (30.0, 3.2)];
        assert_eq!(first_reach(&bumpy, 4.0), Some(10.0 * (8.0 - 4.0) / (8.0 - 3.8)));
        let late = [(0.0, 8.0), (10.0, 4.2), (20.0, 4.4), (30.0, 3.4)];
        assert!((first_reach(&late, 4.0).expect("reached") - (20.0 + 10.0 * 0.4 / 1.0)).abs() < 1e-12);
    }

    fn run(arch: Arch, seed: u64, text: &[f64], image: &[f64]) -> StudyRun {
        StudyRun {
            arch,
            seed,
            steps: 40,
            params: 1,
            wall_s: 0.0,
            run_dir: PathBuf::from(format!("seed-{seed}/{arch}")),
            curve: text
                .iter()
                .zip(image)
                .enumerate()
                .map(|(i, (&t, &im))| EvalPoint {
                    step: 10 * i as u64,
                    text: Some(t),
                    image: Some(im),
                    speech: None,
                    diffusion: None,
                })
                .collect(),
        }
    }

    #[test]
    fn matches_are_per_seed_against_that_seeds_dense() {
        let runs = vec![
            run(Arch::Dense, 0, &[8.0, 6.0, 5.0, 4.5, 4.0], &[6.0, 4.0, 3.0, 2.5, 2.0]),
            run(Arch::Mot, 0, &[8.0, 5.0, 4.0, 3.5, 3.0], &[6.0, 3.0, 2.0, 1.8, 1.6]),
            run(Arch::Moe, 0, &[8.0, 6.5, 5.5, 5.0, 4.6], &[6.0, 4.5, 3.5, 3.0, 2.5]),
            run(Arch::Dense, 1, &[8.0, 6.0, 5.2, 4.6, 4.2], &[6.0, 4.0, 3.0, 2.6, 2.2]),
            run(Arch::Mot, 1, &[8.0, 5.2, 4.2, 3.8, 3.2], &[6.0, 3.2, 2.2, 2.0, 1.8]),
            run(Arch::Moe, 1, &[8.0, 6.0, 5.0, 4.2, 4.1], &[6.0, 4.5, 3.5, 3.0, 2.5]),
        ];
        let archs = [Arch::Dense, Arch::Mot, Arch::Moe];
        let m = match_runs(&runs, &archs, &[0, 1]);
        // text/mot, text/moe, image/mot, image/moe: speech and diffusion have no values.
        let keys: Vec<(String, Arch)> = m.iter().map(|m| (m.curve.clone(), m.arch)).collect();
        assert_eq!(
            keys,
            vec![
                ("text".into(), Arch::Mot),
                ("text".into(), Arch::Moe),
                ("image".into(), Arch::Mot),
                ("image".into(), Arch::Moe),
            ]
        );
        // Image, MoT: seed 0 reaches 2.0 exactly at step 20; seed 1 reaches 2.2 at step 20.
        let img = &m[2];
        assert_eq!(img.per_seed.iter().map(|s| s.step).collect::<Vec<_>>(), vec![Some(20.0), Some(20.0)]);
        assert_eq!(img.fraction.map(|f| (f.mean, f.n)), Some((0.5, 2)));
        assert_eq!(img.paper.as_ref().map(|p| p.fraction), Some(0.26));
        // Text, MoT: seed 0 target 4.0 reached at step 20 exactly; seed 1 target 4.2 at step 20.
        assert_eq!(m[0].fraction.map(|f| (f.min, f.max)), Some((0.5, 0.5)));
        // Text, MoE: seed 0 never reaches 4.0; seed 1 reaches 4.2 between 30 (4.2) -> at 30.
        let moe = &m[1];
        assert_eq!((moe.reached, moe.seeds), (1, 2));
        assert_eq!(moe.per_seed[0].step, None);
        assert_eq!(moe.per_seed[1].step, Some(30.0));
        assert_eq!(moe.step.map(|s| s.n), Some(1));
        assert_eq!(moe.dense_final.map(|d| (d.min, d.max)), Some((4.0, 4.2)));
        // Image, MoE never reaches dense in either seed.
        assert_eq!(m[3].reached, 0);
        assert!(m[3].fraction.is_none());
        let report = StudyReport {
            schema: SCHEMA.into(),
            preset: "tiny".into(),
            positions: PositionShares { text: 0.4, image: 0.3, speech: 0.3, batches: 1 },
            steps: 40,
            eval_every: 10,
            eval_batches: 1,
            seeds: vec![0, 1],
            archs: archs.to_vec(),
            matches: m,
            runs,
            plot: None,
        };
        let table = report.table();
        assert!(table.contains("not reached (> 1)"), "{table}");
        assert!(table.contains("(reached in 1/2 seeds)"), "{table}");
        assert!(table.contains("0.260 (37M)"), "{table}");
        let dir = tempfile::tempdir().expect("tempdir");
        let png = dir.path().join("study.png");
        plot_study(&report, &png, "hand-made").expect("plot");
        assert_eq!(&std::fs::read(&png).expect("png")[1..4], b"PNG");
    }
}
