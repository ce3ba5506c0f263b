//! Plots and ensemble snapshots: the right pixel size, not blank, written where the run writes,
//! and the recorded fields agree with the ensembles.

use std::path::Path;
use std::process::Command;

use enff::backend::cpu::Cpu;
use enff::experiment::plots::{
    render_metrics, write_run_plots, Format, FIELD_SIZE, HOVMOLLER_SIZE, METRICS_SIZE,
};
use enff::experiment::trace::{Recorder, TraceOptions};
use enff::experiment::{preset, CycleMetrics, Experiment};
use enff::io::npy::read_npy;

/// Decodes a PNG file: (width, height, RGB bytes).
fn decode_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// Fraction of non-white pixels and the number of distinct colours.
fn ink(rgb: &[u8]) -> (f64, usize) {
    let px: Vec<[u8; 3]> = rgb.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect();
    let inked = px.iter().filter(|p| **p != [255, 255, 255]).count();
    let mut distinct = px.clone();
    distinct.sort_unstable();
    distinct.dedup();
    (inked as f64 / px.len() as f64, distinct.len())
}

fn assert_png(path: &Path, size: (u32, u32), min_ink: f64, min_colors: usize) {
    let (w, h, rgb) = decode_png(path);
    assert_eq!((w, h), size, "{}", path.display());
    let (frac, colors) = ink(&rgb);
    assert!(
        frac > min_ink && colors >= min_colors,
        "{}: {:.4} of the pixels inked, {colors} colours",
        path.display(),
        frac
    );
}

fn assert_svg(path: &Path, size: (u32, u32)) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.contains(&format!("width=\"{}\"", size.0))
            && text.contains(&format!("height=\"{}\"", size.1)),
        "{}",
        path.display()
    );
    assert!(text.matches("<polyline").count() + text.matches("<rect").count() > 10);
    assert!(text.contains("<text"), "{}: no labels", path.display());
}

fn rows(k: usize, scale: f64) -> Vec<CycleMetrics> {
    (1..=k)
        .map(|c| CycleMetrics {
            cycle: c,
            time: c as f64 * 0.05,
            rmse_forecast: scale,
            spread_forecast: scale,
            rmse: scale * (1.0 + 3.0 / c as f64),
            spread: 0.7 * scale,
            seconds_forecast: 0.0,
            seconds_analysis: 0.0,
            ess: None,
        })
        .collect()
}

#[test]
fn metric_chart_has_the_size_and_every_series_colour() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (rows(40, 0.3), rows(40, 1.1));
    let series = [("enff-f2p", &a[..]), ("etkf", &b[..])];
    let png = render_metrics(&series, "two filters", Format::Png).unwrap();
    let path = dir.path().join("m.png");
    std::fs::write(&path, &png).unwrap();
    assert_png(&path, METRICS_SIZE, 0.01, 4);
    let (_, _, rgb) = decode_png(&path);
    // Both line colours are drawn, in quantity (lines are 2 px wide over the whole width).
    for color in [[31u8, 96, 180], [214, 60, 40]] {
        let count = rgb.chunks_exact(3).filter(|p| *p == color).count();
        assert!(count > 500, "colour {color:?}: {count} pixels");
    }
    let svg = render_metrics(&series, "two filters", Format::Svg).unwrap();
    let path = dir.path().join("m.svg");
    std::fs::write(&path, &svg).unwrap();
    assert_svg(&path, METRICS_SIZE);
    assert!(String::from_utf8_lossy(&svg).contains("etkf"));
}

fn small(name: &str, sets: &[&str]) -> Experiment {
    let p = preset(name).unwrap();
    let mut cfg = p.config.clone();
    for s in sets {
        cfg.set(s).unwrap();
    }
    Experiment::new(p.name, cfg, None).unwrap()
}

#[test]
fn a_lorenz96_run_writes_rmse_and_hovmoller_plots_and_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let exp = small(
        "lorenz96_bao2024",
        &[
            "model.d=1100",
            "ensemble.n=6",
            "experiment.cycles=13",
            "experiment.burn_in=2",
            "experiment.spinup=50",
            "filter.flow_steps=3",
        ],
    );
    let cpu = Cpu::new();
    let options = TraceOptions {
        max_cycles: 5,
        save_every: Some(4),
        save_dir: dir.path().join("ensembles"),
        ..TraceOptions::default()
    };
    let mut rec = Recorder::<Cpu>::new(exp.config(), options).unwrap();
    let report = exp.run_observed(&cpu, |_| {}, |s| rec.observe(s)).unwrap();
    let trace = rec.finish();
    // At most 512 components (every 3rd of 1100 = 367) and 5 cycles (every 3rd, and the last).
    let h = trace.hovmoller.as_ref().unwrap();
    assert_eq!(h.components.len(), 367);
    assert_eq!(h.components[1], 3);
    assert_eq!(h.cycles, vec![1, 4, 7, 10, 13]);
    assert_eq!(h.truth.len(), 5 * 367);
    assert_eq!(h.mean.len(), 5 * 367);
    // Snapshots every 4 cycles, n x d, and the recorded mean is their mean.
    assert_eq!(trace.snapshots.len(), 3);
    for (k, cycle) in [4usize, 8, 12].iter().enumerate() {
        let path = dir.path().join(format!("ensembles/cycle_{cycle:04}.npy"));
        assert_eq!(trace.snapshots[k], path);
        let a = read_npy(&path).unwrap();
        assert_eq!(a.shape, vec![6, 1100]);
        if let Some(row) = h.cycles.iter().position(|c| c == cycle) {
            for (j, &comp) in h.components.iter().enumerate() {
                let mean = (0..6).map(|i| a.data[i * 1100 + comp] as f64).sum::<f64>() / 6.0;
                assert!((mean - h.mean[row * 367 + j] as f64).abs() < 1e-5);
            }
        }
    }
    // The recorded analysis mean is as far from the truth as the run's RMSE says (on the
    // kept components, for the last cycle).
    let last = (h.cycles.len() - 1) * 367;
    let err = (0..367)
        .map(|j| ((h.mean[last + j] - h.truth[last + j]) as f64).powi(2))
        .sum::<f64>()
        / 367.0;
    let rmse = report.metrics.last().unwrap().rmse;
    assert!(
        (err.sqrt() - rmse).abs() < 0.15 * rmse + 1e-3,
        "{} vs {rmse}",
        err.sqrt()
    );

    let out = dir.path().join("plots");
    let written = write_run_plots(&out, &report, Some(&trace)).unwrap();
    assert_eq!(written.len(), 4);
    assert_png(&out.join("rmse_spread.png"), METRICS_SIZE, 0.01, 3);
    assert_svg(&out.join("rmse_spread.svg"), METRICS_SIZE);
    // Three full panels of colour: a large inked fraction, many colours.
    assert_png(&out.join("hovmoller.png"), HOVMOLLER_SIZE, 0.3, 100);
    assert_svg(&out.join("hovmoller.svg"), HOVMOLLER_SIZE);
}

#[test]
fn a_navier_stokes_run_writes_field_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let exp = small(
        "ns_64",
        &[
            "model.d=16",
            "experiment.cycles=2",
            "experiment.burn_in=0",
            "filter.flow_steps=3",
        ],
    );
    let cpu = Cpu::new();
    let mut rec = Recorder::<Cpu>::new(exp.config(), TraceOptions::default()).unwrap();
    let report = exp.run_observed(&cpu, |_| {}, |s| rec.observe(s)).unwrap();
    let trace = rec.finish();
    assert!(trace.hovmoller.is_none());
    let f = trace.field.as_ref().unwrap();
    assert_eq!(
        (f.n, f.cycle, f.truth.len(), f.mean.len()),
        (16, 2, 768, 768)
    );
    let written = write_run_plots(dir.path(), &report, Some(&trace)).unwrap();
    assert_eq!(written.len(), 4);
    assert_png(&dir.path().join("field.png"), FIELD_SIZE, 0.25, 100);
    assert_svg(&dir.path().join("field.svg"), FIELD_SIZE);
}

fn enff_bin(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_enff"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("ENFF_REQUIRE_GPU")
        .output()
        .expect("the enff binary runs")
}

#[test]
fn run_and_compare_write_plots_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let common = [
        "--backend",
        "cpu",
        "--set",
        "model.d=40",
        "--set",
        "experiment.cycles=10",
        "--set",
        "experiment.burn_in=2",
        "--set",
        "experiment.spinup=50",
    ];
    let run = dir.path().join("run");
    let mut args = vec!["run", "lorenz96_sakov2008", "--save-ensembles", "5"];
    args.extend(common);
    args.extend(["--out", run.to_str().unwrap()]);
    let o = enff_bin(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "rmse_spread.png",
        "rmse_spread.svg",
        "hovmoller.png",
        "hovmoller.svg",
        "ensembles/cycle_0005.npy",
        "ensembles/cycle_0010.npy",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let snap = read_npy(&run.join("ensembles/cycle_0010.npy")).unwrap();
    assert_eq!(
        snap.shape,
        vec![
            summary["n"].as_u64().unwrap() as usize,
            summary["d"].as_u64().unwrap() as usize
        ]
    );

    let quiet = dir.path().join("noplots");
    let mut args = vec!["run", "lorenz96_sakov2008", "--no-plots"];
    args.extend(common);
    args.extend(["--out", quiet.to_str().unwrap()]);
    let o = enff_bin(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(quiet.join("summary.json").is_file());
    assert!(!quiet.join("rmse_spread.png").exists());
    assert!(!quiet.join("hovmoller.svg").exists());

    let cmp = dir.path().join("cmp");
    let mut args = vec!["compare", "lorenz96_sakov2008", "--filters", "etkf,enkf"];
    args.extend(common);
    args.extend(["--out", cmp.to_str().unwrap()]);
    let o = enff_bin(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_png(&cmp.join("rmse_spread.png"), METRICS_SIZE, 0.01, 4);
    let svg = std::fs::read_to_string(cmp.join("rmse_spread.svg")).unwrap();
    assert!(svg.contains("etkf") && svg.contains("enkf"));
    assert!(cmp.join("etkf/hovmoller.png").is_file());

    let o = enff_bin(&[
        "run",
        "lorenz96_sakov2008",
        "--save-ensembles",
        "0",
        "--backend",
        "cpu",
        "--out",
        dir.path().join("zero").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--save-ensembles"));
}
