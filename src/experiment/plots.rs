//! Plots of a run, drawn with plotters as PNG and SVG.
//!
//! - `rmse_spread.{png,svg}`: analysis RMSE (solid) and spread (dashed) against the cycle, one
//!   colour per filter (every filter of `enff compare` on one chart);
//! - `hovmoller.{png,svg}` for 1-D systems: truth, analysis mean and error as time × component
//!   diagrams, from the [`Trace`] the run kept;
//! - `field.{png,svg}` for 2-D systems: vorticity of the truth, the analysis mean and the error at
//!   the last cycle.
//!
//! PNG text is drawn with a small built-in pixel font (no system fonts needed); SVG text is
//! left to the viewer's fonts. Every file is written atomically.
//!
//! ```
//! use enff::experiment::plots::{render_metrics, Format, METRICS_SIZE};
//! use enff::experiment::CycleMetrics;
//!
//! # fn main() -> enff::Result<()> {
//! let rows: Vec<CycleMetrics> = (1..=20)
//!     .map(|k| CycleMetrics {
//!         cycle: k,
//!         time: 0.1 * k as f64,
//!         rmse_forecast: 1.0,
//!         spread_forecast: 1.0,
//!         rmse: 1.0 / k as f64,
//!         spread: 0.8 / k as f64,
//!         seconds_forecast: 0.0,
//!         seconds_analysis: 0.0,
//!         ess: None,
//!     })
//!     .collect();
//! let svg = render_metrics(&[("enff-f2p", &rows[..])], "example", Format::Svg)?;
//! assert!(String::from_utf8_lossy(&svg).contains("<svg"));
//! let png = render_metrics(&[("enff-f2p", &rows[..])], "example", Format::Png)?;
//! assert_eq!(&png[1..4], b"PNG");
//! # let _ = METRICS_SIZE;
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

use super::report::Report;
use super::trace::{FieldSnapshot, Hovmoller, Trace};
use crate::cycle::CycleMetrics;
use crate::error::{Error, Result};
use crate::io::write_atomic;

/// Pixel size of the RMSE/spread chart.
pub const METRICS_SIZE: (u32, u32) = (1000, 600);
/// Pixel size of the Hovmöller diagrams (three panels stacked).
pub const HOVMOLLER_SIZE: (u32, u32) = (1000, 900);
/// Pixel size of the field snapshots (three panels side by side).
pub const FIELD_SIZE: (u32, u32) = (1200, 390);

/// Image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// 8-bit RGB PNG.
    Png,
    /// SVG text.
    Svg,
}

impl Format {
    /// File extension.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Png => "png",
            Format::Svg => "svg",
        }
    }
}

/// How text reaches the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TextMode {
    /// The backend draws text itself (SVG).
    Native,
    /// Text as pixels of the built-in font (bitmaps).
    Pixel,
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::invalid("plot", e, "the drawing failed: please report this")
}

/// Renders one figure in `format`: `$draw` is called with the root area and the text mode.
macro_rules! render {
    ($format:expr, $size:expr, |$root:ident, $mode:ident| $draw:expr) => {{
        let (w, h) = $size;
        match $format {
            Format::Png => {
                let mut buf = vec![255u8; w as usize * h as usize * 3];
                {
                    let $root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
                    let $mode = TextMode::Pixel;
                    $root.fill(&WHITE).map_err(plot_error)?;
                    $draw.map_err(plot_error)?;
                    $root.present().map_err(plot_error)?;
                }
                encode_png(&buf, w, h)
            }
            Format::Svg => {
                let mut s = String::new();
                {
                    let $root = SVGBackend::with_string(&mut s, (w, h)).into_drawing_area();
                    let $mode = TextMode::Native;
                    $root.fill(&WHITE).map_err(plot_error)?;
                    $draw.map_err(plot_error)?;
                    $root.present().map_err(plot_error)?;
                }
                Ok(s.into_bytes())
            }
        }
    }};
}

/// Encodes an RGB buffer as PNG.
fn encode_png(rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(plot_error)?;
        writer.write_image_data(rgb).map_err(plot_error)?;
        writer.finish().map_err(plot_error)?;
    }
    Ok(out)
}

// ---- text -------------------------------------------------------------------------------------

/// A 5 × 7 pixel font of letters, digits and common punctuation (anything else draws as `?`):
/// one 5-bit row per line, top to bottom, bit 4 = left.
#[rustfmt::skip]
const FONT: &[(char, [u8; 7])] = &[
    (' ', [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000]),
    ('!', [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00100]),
    ('"', [0b01010, 0b01010, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000]),
    ('#', [0b01010, 0b11111, 0b01010, 0b01010, 0b11111, 0b01010, 0b00000]),
    ('%', [0b11001, 0b11010, 0b00010, 0b00100, 0b01000, 0b01011, 0b10011]),
    ('\'', [0b00100, 0b00100, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000]),
    ('(', [0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010]),
    (')', [0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000]),
    ('*', [0b00000, 0b00100, 0b10101, 0b01110, 0b10101, 0b00100, 0b00000]),
    ('+', [0b00000, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0b00000]),
    (',', [0b00000, 0b00000, 0b00000, 0b00000, 0b00110, 0b00100, 0b01000]),
    ('-', [0b00000, 0b00000, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000]),
    ('.', [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100]),
    ('/', [0b00001, 0b00010, 0b00010, 0b00100, 0b01000, 0b01000, 0b10000]),
    ('0', [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110]),
    ('1', [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110]),
    ('2', [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111]),
    ('3', [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110]),
    ('4', [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010]),
    ('5', [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110]),
    ('6', [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110]),
    ('7', [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000]),
    ('8', [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110]),
    ('9', [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100]),
    (':', [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00000]),
    (';', [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b00100, 0b01000]),
    ('<', [0b00010, 0b00100, 0b01000, 0b10000, 0b01000, 0b00100, 0b00010]),
    ('=', [0b00000, 0b00000, 0b11111, 0b00000, 0b11111, 0b00000, 0b00000]),
    ('>', [0b01000, 0b00100, 0b00010, 0b00001, 0b00010, 0b00100, 0b01000]),
    ('?', [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b00000, 0b00100]),
    ('[', [0b01110, 0b01000, 0b01000, 0b01000, 0b01000, 0b01000, 0b01110]),
    (']', [0b01110, 0b00010, 0b00010, 0b00010, 0b00010, 0b00010, 0b01110]),
    ('_', [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b11111]),
    ('|', [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100]),
    ('A', [0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001]),
    ('B', [0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110]),
    ('C', [0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110]),
    ('D', [0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100]),
    ('E', [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111]),
    ('F', [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000]),
    ('G', [0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111]),
    ('H', [0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001]),
    ('I', [0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110]),
    ('J', [0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100]),
    ('K', [0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001]),
    ('L', [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111]),
    ('M', [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001]),
    ('N', [0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001]),
    ('O', [0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110]),
    ('P', [0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000]),
    ('Q', [0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101]),
    ('R', [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001]),
    ('S', [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110]),
    ('T', [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100]),
    ('U', [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110]),
    ('V', [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100]),
    ('W', [0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010]),
    ('X', [0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001]),
    ('Y', [0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100]),
    ('Z', [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111]),
    ('a', [0b00000, 0b00000, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111]),
    ('b', [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b11110]),
    ('c', [0b00000, 0b00000, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110]),
    ('d', [0b00001, 0b00001, 0b01101, 0b10011, 0b10001, 0b10001, 0b01111]),
    ('e', [0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110]),
    ('f', [0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000]),
    ('g', [0b00000, 0b01111, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110]),
    ('h', [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001]),
    ('i', [0b00100, 0b00000, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110]),
    ('j', [0b00010, 0b00000, 0b00110, 0b00010, 0b00010, 0b10010, 0b01100]),
    ('k', [0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010]),
    ('l', [0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110]),
    ('m', [0b00000, 0b00000, 0b11010, 0b10101, 0b10101, 0b10001, 0b10001]),
    ('n', [0b00000, 0b00000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001]),
    ('o', [0b00000, 0b00000, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110]),
    ('p', [0b00000, 0b00000, 0b11110, 0b10001, 0b11110, 0b10000, 0b10000]),
    ('q', [0b00000, 0b00000, 0b01101, 0b10011, 0b01111, 0b00001, 0b00001]),
    ('r', [0b00000, 0b00000, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000]),
    ('s', [0b00000, 0b00000, 0b01110, 0b10000, 0b01110, 0b00001, 0b11110]),
    ('t', [0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110]),
    ('u', [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101]),
    ('v', [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100]),
    ('w', [0b00000, 0b00000, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010]),
    ('x', [0b00000, 0b00000, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001]),
    ('y', [0b00000, 0b00000, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110]),
    ('z', [0b00000, 0b00000, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111]),
];

fn glyph(c: char) -> &'static [u8; 7] {
    let c = match c {
        '×' => 'x',
        '–' | '—' | '−' => '-',
        c => c,
    };
    FONT.iter()
        .find(|(g, _)| *g == c)
        .or_else(|| FONT.iter().find(|(g, _)| *g == '?'))
        .map(|(_, rows)| rows)
        .unwrap_or(&[0; 7])
}

/// Text at `pos` anchored by `anchor`; `scale` = pixel size of one font dot (SVG: font size
/// `10·scale` px); `vertical` reads bottom to top.
#[allow(clippy::too_many_arguments)]
fn text<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    mode: TextMode,
    s: &str,
    pos: (i32, i32),
    scale: i32,
    anchor: (HPos, VPos),
    vertical: bool,
    color: RGBColor,
) -> DrawResult<DB> {
    match mode {
        TextMode::Native => {
            let mut style = TextStyle::from(("sans-serif", 11.0 * scale as f64).into_font())
                .color(&color)
                .pos(Pos::new(anchor.0, anchor.1));
            if vertical {
                style = style.transform(FontTransform::Rotate270);
            }
            root.draw_text(s, &style, pos)
        }
        TextMode::Pixel => {
            let len = s.chars().count() as i32;
            // Extent along the text and across it.
            let along = (6 * len - 1).max(0) * scale;
            let across = 7 * scale;
            let off = |h: HPos, size: i32| match h {
                HPos::Left => 0,
                HPos::Center => size / 2,
                HPos::Right => size,
            };
            let offv = |v: VPos, size: i32| match v {
                VPos::Top => 0,
                VPos::Center => size / 2,
                VPos::Bottom => size,
            };
            // Top-left corner of the text box on screen.
            let (x0, y0) = if vertical {
                // Rotated: the anchor's horizontal position runs along the screen's y axis
                // (upwards), its vertical position along x.
                (
                    pos.0 - offv(anchor.1, across),
                    pos.1 - (along - off(anchor.0, along)),
                )
            } else {
                (pos.0 - off(anchor.0, along), pos.1 - offv(anchor.1, across))
            };
            let style = color.filled();
            for (ci, c) in s.chars().enumerate() {
                let rows = glyph(c);
                for (gy, bits) in rows.iter().enumerate() {
                    for gx in 0..5 {
                        if bits & (0b10000 >> gx) == 0 {
                            continue;
                        }
                        let u = (ci as i32 * 6 + gx) * scale; // along the text
                        let v = gy as i32 * scale; // across (downwards)
                        let (px, py) = if vertical {
                            (x0 + v, y0 + along - u - scale)
                        } else {
                            (x0 + u, y0 + v)
                        };
                        root.draw(&Rectangle::new([(px, py), (px + scale, py + scale)], style))?;
                    }
                }
            }
            Ok(())
        }
    }
}

// ---- axes -------------------------------------------------------------------------------------

/// About `target` round tick values covering `[lo, hi]`.
fn linear_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    let span = (hi - lo).abs().max(1e-12);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let ticks = (first..=last).map(|k| k as f64 * step).collect();
    (ticks, step)
}

fn format_tick(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if v.abs() >= 1e5 || v.abs() < 1e-3 {
        return format!("{v:.0e}");
    }
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

/// Tick values of a log axis over `[lo, hi]` (both positive).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let mults: &[f64] = if b - a <= 2 { &[1.0, 2.0, 5.0] } else { &[1.0] };
    let mut t = Vec::new();
    for e in a..=b {
        for m in mults {
            let v = m * 10f64.powi(e);
            if v >= lo * 0.999 && v <= hi * 1.001 {
                t.push(v);
            }
        }
    }
    t
}

/// One axis: range in data units and whether it is logarithmic.
#[derive(Clone, Copy, Debug)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn map(&self, v: f64) -> f64 {
        if self.log {
            v.max(self.lo).log10()
        } else {
            v
        }
    }
    fn range(&self) -> std::ops::Range<f64> {
        self.map(self.lo)..self.map(self.hi)
    }
    fn ticks(&self) -> Vec<(f64, String)> {
        if self.log {
            log_ticks(self.lo, self.hi)
                .into_iter()
                .map(|v| (v, format_tick(v, v)))
                .collect()
        } else {
            let (t, step) = linear_ticks(self.lo, self.hi, 6);
            t.into_iter().map(|v| (v, format_tick(v, step))).collect()
        }
    }
}

const INK: RGBColor = RGBColor(30, 30, 30);
const GRID: RGBColor = RGBColor(225, 225, 225);

/// Frame, grid, ticks and labels of a plot rectangle `(x0, y0)–(x1, y1)` in pixels.
#[allow(clippy::too_many_arguments)]
fn frame<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    mode: TextMode,
    rect: (i32, i32, i32, i32),
    x: Axis,
    y: Axis,
    xlabel: &str,
    ylabel: &str,
    grid: bool,
) -> DrawResult<DB> {
    let (x0, y0, x1, y1) = rect;
    let px = |v: f64| {
        let r = x.range();
        x0 + ((x.map(v) - r.start) / (r.end - r.start).max(1e-300) * (x1 - x0) as f64).round()
            as i32
    };
    let py = |v: f64| {
        let r = y.range();
        y1 - ((y.map(v) - r.start) / (r.end - r.start).max(1e-300) * (y1 - y0) as f64).round()
            as i32
    };
    for (v, label) in x.ticks() {
        let p = px(v);
        if grid {
            root.draw(&PathElement::new(vec![(p, y0), (p, y1)], GRID))?;
        }
        root.draw(&PathElement::new(vec![(p, y1), (p, y1 + 5)], INK))?;
        text(
            root,
            mode,
            &label,
            (p, y1 + 9),
            2,
            (HPos::Center, VPos::Top),
            false,
            INK,
        )?;
    }
    for (v, label) in y.ticks() {
        let p = py(v);
        if grid {
            root.draw(&PathElement::new(vec![(x0, p), (x1, p)], GRID))?;
        }
        root.draw(&PathElement::new(vec![(x0 - 5, p), (x0, p)], INK))?;
        text(
            root,
            mode,
            &label,
            (x0 - 9, p),
            2,
            (HPos::Right, VPos::Center),
            false,
            INK,
        )?;
    }
    root.draw(&Rectangle::new([(x0, y0), (x1, y1)], INK.stroke_width(1)))?;
    text(
        root,
        mode,
        xlabel,
        ((x0 + x1) / 2, y1 + 32),
        2,
        (HPos::Center, VPos::Top),
        false,
        INK,
    )?;
    text(
        root,
        mode,
        ylabel,
        (x0 - 72, (y0 + y1) / 2),
        2,
        (HPos::Center, VPos::Top),
        true,
        INK,
    )
}

// ---- colours ----------------------------------------------------------------------------------

/// Line colours of the filters, in order.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 96, 180),
    RGBColor(214, 60, 40),
    RGBColor(40, 150, 60),
    RGBColor(140, 90, 190),
    RGBColor(240, 130, 20),
    RGBColor(20, 170, 190),
    RGBColor(140, 90, 70),
    RGBColor(220, 110, 180),
    RGBColor(110, 110, 110),
    RGBColor(170, 170, 30),
];

fn lerp_colors(anchors: &[(u8, u8, u8)], t: f64) -> RGBColor {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let s = t * (anchors.len() - 1) as f64;
    let i = (s.floor() as usize).min(anchors.len() - 2);
    let f = s - i as f64;
    let (a, b) = (anchors[i], anchors[i + 1]);
    let mix = |p: u8, q: u8| (p as f64 + (q as f64 - p as f64) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Sequential map (dark blue → teal → yellow) for fields.
fn sequential(t: f64) -> RGBColor {
    lerp_colors(
        &[
            (40, 20, 90),
            (50, 90, 170),
            (30, 160, 150),
            (140, 200, 80),
            (250, 225, 50),
        ],
        t,
    )
}

/// Diverging map (blue → white → red) for errors.
fn diverging(t: f64) -> RGBColor {
    lerp_colors(&[(30, 70, 160), (245, 245, 245), (180, 30, 40)], t)
}

/// A colour scale: map and value range.
#[derive(Clone, Copy)]
struct Scale {
    map: fn(f64) -> RGBColor,
    lo: f64,
    hi: f64,
}

impl Scale {
    fn color(&self, v: f64) -> RGBColor {
        (self.map)((v - self.lo) / (self.hi - self.lo).max(1e-30))
    }
    /// Symmetric about zero, covering `values` (largest |v|).
    fn symmetric(values: &[f32]) -> Self {
        let a = values
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f64, |a, &v| a.max(v.abs() as f64))
            .max(1e-12);
        Scale {
            map: diverging,
            lo: -a,
            hi: a,
        }
    }
    /// Covering every value of `sets`.
    fn covering(sets: &[&[f32]]) -> Self {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for s in sets {
            for &v in s.iter().filter(|v| v.is_finite()) {
                lo = lo.min(v as f64);
                hi = hi.max(v as f64);
            }
        }
        if !(lo.is_finite() && hi.is_finite()) {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo < 1e-12 {
            hi = lo + 1.0;
        }
        Scale {
            map: sequential,
            lo,
            hi,
        }
    }
}

/// A `rows × cols` grid drawn into a pixel rectangle: row 0 at the bottom, column 0 at the left.
/// Bitmaps get one rectangle per pixel; SVG at most 120 × 90 cells (nearest value), which
/// keeps a three-panel SVG near 3 MB.
fn heatmap<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    mode: TextMode,
    rect: (i32, i32, i32, i32),
    values: &[f32],
    (rows, cols): (usize, usize),
    scale: Scale,
) -> DrawResult<DB> {
    let (x0, y0, x1, y1) = rect;
    let (w, h) = ((x1 - x0).max(1) as usize, (y1 - y0).max(1) as usize);
    let (cw, ch) = match mode {
        TextMode::Pixel => (w, h),
        TextMode::Native => (w.min(cols).min(120), h.min(rows).min(90)),
    };
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    for a in 0..cw {
        let c = (a * cols / cw).min(cols - 1);
        let (px0, px1) = (x0 + (a * w / cw) as i32, x0 + ((a + 1) * w / cw) as i32);
        for b in 0..ch {
            let r = (b * rows / ch).min(rows - 1);
            let (py1, py0) = (y1 - (b * h / ch) as i32, y1 - ((b + 1) * h / ch) as i32);
            let v = values[r * cols + c] as f64;
            root.draw(&Rectangle::new(
                [(px0, py0), (px1.max(px0 + 1), py1.max(py0 + 1))],
                scale.color(v).filled(),
            ))?;
        }
    }
    Ok(())
}

/// A vertical colour bar with its end values.
fn colorbar<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    mode: TextMode,
    rect: (i32, i32, i32, i32),
    scale: Scale,
) -> DrawResult<DB> {
    let (x0, y0, x1, y1) = rect;
    let steps = (y1 - y0).max(1);
    for k in 0..steps {
        let v = scale.lo + (scale.hi - scale.lo) * k as f64 / (steps - 1).max(1) as f64;
        root.draw(&Rectangle::new(
            [(x0, y1 - k - 1), (x1, y1 - k)],
            scale.color(v).filled(),
        ))?;
    }
    root.draw(&Rectangle::new([(x0, y0), (x1, y1)], INK))?;
    let (_, step) = linear_ticks(scale.lo, scale.hi, 4);
    for (v, y) in [(scale.hi, y0), (scale.lo, y1)] {
        text(
            root,
            mode,
            &format_tick(v, step / 10.0),
            (x1 + 6, y),
            2,
            (HPos::Left, VPos::Center),
            false,
            INK,
        )?;
    }
    Ok(())
}

// ---- figures ----------------------------------------------------------------------------------

fn draw_metrics<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    mode: TextMode,
    series: &[(&str, &[CycleMetrics])],
    title: &str,
) -> DrawResult<DB> {
    let (w, h) = root.dim_in_pixel();
    let rect = (100, 50, w as i32 - 30, h as i32 - 70);
    let all = || series.iter().flat_map(|(_, rows)| rows.iter());
    let xmax = all().map(|r| r.cycle).max().unwrap_or(1).max(2) as f64;
    let xmin = all().map(|r| r.cycle).min().unwrap_or(1) as f64;
    let values: Vec<f64> = all()
        .flat_map(|r| [r.rmse, r.spread])
        .filter(|v| v.is_finite())
        .collect();
    let vmax = values.iter().cloned().fold(0.0f64, f64::max).max(1e-9);
    let vmin_pos = values
        .iter()
        .cloned()
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let log = vmin_pos.is_finite() && vmax / vmin_pos > 30.0;
    let y = if log {
        Axis {
            lo: vmin_pos * 0.8,
            hi: vmax * 1.25,
            log: true,
        }
    } else {
        Axis {
            lo: 0.0,
            hi: vmax * 1.08,
            log: false,
        }
    };
    let x = Axis {
        lo: xmin,
        hi: xmax,
        log: false,
    };
    let ylabel = if log {
        "rmse (solid), spread (dashed), log scale"
    } else {
        "rmse (solid), spread (dashed)"
    };
    frame(root, mode, rect, x, y, "cycle", ylabel, true)?;
    text(
        root,
        mode,
        title,
        (w as i32 / 2, 14),
        2,
        (HPos::Center, VPos::Top),
        false,
        INK,
    )?;
    let area = root.margin(rect.1, h as i32 - rect.3, rect.0, w as i32 - rect.2);
    let mut chart = ChartBuilder::on(&area).build_cartesian_2d(x.range(), y.range())?;
    for (i, (name, rows)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts = |f: fn(&CycleMetrics) -> f64| -> Vec<(f64, f64)> {
            rows.iter()
                .filter(|r| f(r).is_finite())
                .map(|r| (r.cycle as f64, y.map(f(r))))
                .collect()
        };
        chart.draw_series(LineSeries::new(pts(|r| r.rmse), color.stroke_width(2)))?;
        chart.draw_series(DashedLineSeries::new(
            pts(|r| r.spread),
            6,
            4,
            color.stroke_width(2),
        ))?;
        // Legend entry, top right.
        let (lx, ly) = (rect.2 - 160, rect.1 + 14 + 22 * i as i32);
        root.draw(&PathElement::new(
            vec![(lx, ly), (lx + 30, ly)],
            color.stroke_width(3),
        ))?;
        text(
            root,
            mode,
            name,
            (lx + 38, ly),
            2,
            (HPos::Left, VPos::Center),
            false,
            INK,
        )?;
    }
    Ok(())
}

fn draw_hovmoller<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    mode: TextMode,
    hov: &Hovmoller,
    d: usize,
    title: &str,
) -> DrawResult<DB> {
    let (w, h) = root.dim_in_pixel();
    let (rows_t, cols) = (hov.cycles.len(), hov.components.len());
    // Transpose to component rows × cycle columns (time runs left to right).
    let transpose = |v: &[f32]| -> Vec<f32> {
        let mut out = vec![0.0; v.len()];
        for t in 0..rows_t {
            for c in 0..cols {
                out[c * rows_t + t] = v[t * cols + c];
            }
        }
        out
    };
    let truth = transpose(&hov.truth);
    let mean = transpose(&hov.mean);
    let error: Vec<f32> = mean.iter().zip(&truth).map(|(a, b)| a - b).collect();
    let field_scale = Scale::covering(&[&truth, &mean]);
    let err_scale = Scale::symmetric(&error);
    text(
        root,
        mode,
        title,
        (w as i32 / 2, 10),
        2,
        (HPos::Center, VPos::Top),
        false,
        INK,
    )?;
    let panels: [(&str, &[f32], Scale); 3] = [
        ("truth", &truth, field_scale),
        ("analysis mean", &mean, field_scale),
        ("error (mean - truth)", &error, err_scale),
    ];
    let top = 40;
    let ph = (h as i32 - top - 60) / 3;
    let first = *hov.cycles.first().unwrap_or(&1) as f64;
    let last = (*hov.cycles.last().unwrap_or(&1) as f64).max(first + 1.0);
    for (k, (name, values, scale)) in panels.iter().enumerate() {
        let y0 = top + k as i32 * ph + 22;
        let rect = (90, y0, w as i32 - 130, y0 + ph - 50);
        heatmap(root, mode, rect, values, (cols, rows_t), *scale)?;
        let xlabel = if k == 2 { "cycle" } else { "" };
        frame(
            root,
            mode,
            rect,
            Axis {
                lo: first,
                hi: last,
                log: false,
            },
            Axis {
                lo: 0.0,
                hi: d.saturating_sub(1).max(1) as f64,
                log: false,
            },
            xlabel,
            "component",
            false,
        )?;
        text(
            root,
            mode,
            name,
            (rect.0, rect.1 - 6),
            2,
            (HPos::Left, VPos::Bottom),
            false,
            INK,
        )?;
        colorbar(
            root,
            mode,
            (rect.2 + 12, rect.1, rect.2 + 30, rect.3),
            *scale,
        )?;
    }
    Ok(())
}

/// Vorticity `∂v/∂x − ∂u/∂y` of a `(p, u, v)` state on an `n × n` periodic grid of side 2,
/// as rows of fixed vertical index `j` (bottom to top) × columns of horizontal index `i`.
pub fn vorticity(state: &[f32], n: usize) -> Vec<f32> {
    let nn = n * n;
    let h = 2.0 / n as f32;
    let at = |c: usize, i: usize, j: usize| state[c * nn + (i % n) * n + (j % n)];
    let mut out = vec![0.0f32; nn];
    if state.len() < 3 * nn || n == 0 {
        return out;
    }
    for j in 0..n {
        for i in 0..n {
            let dvdx = (at(2, i + 1, j) - at(2, i + n - 1, j)) / (2.0 * h);
            let dudy = (at(1, i, j + 1) - at(1, i, j + n - 1)) / (2.0 * h);
            out[j * n + i] = dvdx - dudy;
        }
    }
    out
}

fn draw_field<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    mode: TextMode,
    f: &FieldSnapshot,
    title: &str,
) -> DrawResult<DB> {
    let (w, h) = root.dim_in_pixel();
    let n = f.n;
    let truth = vorticity(&f.truth, n);
    let mean = vorticity(&f.mean, n);
    let error: Vec<f32> = mean.iter().zip(&truth).map(|(a, b)| a - b).collect();
    let field_scale = Scale::covering(&[&truth, &mean]);
    let err_scale = Scale::symmetric(&error);
    text(
        root,
        mode,
        title,
        (w as i32 / 2, 10),
        2,
        (HPos::Center, VPos::Top),
        false,
        INK,
    )?;
    let panels: [(&str, &[f32], Scale); 3] = [
        ("truth vorticity", &truth, field_scale),
        ("analysis mean", &mean, field_scale),
        ("error (mean - truth)", &error, err_scale),
    ];
    let pw = w as i32 / 3;
    let side = (pw - 150).min(h as i32 - 130);
    for (k, (name, values, scale)) in panels.iter().enumerate() {
        let x0 = k as i32 * pw + 70;
        let rect = (x0, 60, x0 + side, 60 + side);
        heatmap(root, mode, rect, values, (n, n), *scale)?;
        let ax = Axis {
            lo: 0.0,
            hi: 2.0,
            log: false,
        };
        frame(root, mode, rect, ax, ax, "x", "y", false)?;
        text(
            root,
            mode,
            name,
            (rect.0, rect.1 - 6),
            2,
            (HPos::Left, VPos::Bottom),
            false,
            INK,
        )?;
        colorbar(
            root,
            mode,
            (rect.2 + 10, rect.1, rect.2 + 26, rect.3),
            *scale,
        )?;
    }
    Ok(())
}

/// The RMSE/spread chart of one or several runs (`(label, rows)` each).
pub fn render_metrics(
    series: &[(&str, &[CycleMetrics])],
    title: &str,
    format: Format,
) -> Result<Vec<u8>> {
    render!(format, METRICS_SIZE, |root, mode| draw_metrics(
        &root, mode, series, title
    ))
}

/// The Hovmöller diagrams of a 1-D run (state dimension `d`).
pub fn render_hovmoller(hov: &Hovmoller, d: usize, title: &str, format: Format) -> Result<Vec<u8>> {
    if hov.cycles.is_empty() || hov.components.is_empty() {
        return Err(Error::invalid(
            "hovmoller",
            "empty",
            "the run recorded no cycles",
        ));
    }
    render!(format, HOVMOLLER_SIZE, |root, mode| draw_hovmoller(
        &root, mode, hov, d, title
    ))
}

/// The field snapshots of a 2-D run.
pub fn render_field(field: &FieldSnapshot, title: &str, format: Format) -> Result<Vec<u8>> {
    render!(format, FIELD_SIZE, |root, mode| draw_field(
        &root, mode, field, title
    ))
}

/// Writes `DIR/NAME.png` and `DIR/NAME.svg` from one renderer.
fn write_both(
    dir: &Path,
    name: &str,
    render: impl Fn(Format) -> Result<Vec<u8>>,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    let mut written = Vec::new();
    for format in [Format::Png, Format::Svg] {
        let path = dir.join(format!("{name}.{}", format.extension()));
        write_atomic(&path, &render(format)?)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes the plots of one run into `dir`: the RMSE/spread chart and, when the trace has
/// them, the Hovmöller diagrams or the field snapshots. Returns the files written.
pub fn write_run_plots(dir: &Path, report: &Report, trace: Option<&Trace>) -> Result<Vec<PathBuf>> {
    let s = &report.summary;
    let title = format!("{}: {} on {}", s.preset, s.filter, s.model);
    let mut written = write_both(dir, "rmse_spread", |f| {
        render_metrics(&[(s.filter.as_str(), &report.metrics[..])], &title, f)
    })?;
    if let Some(h) = trace.and_then(|t| t.hovmoller.as_ref()) {
        let title = format!(
            "{}: {} ({} of {} components, {} cycles)",
            s.preset,
            s.filter,
            h.components.len(),
            s.d,
            h.cycles.len()
        );
        written.extend(write_both(dir, "hovmoller", |f| {
            render_hovmoller(h, s.d, &title, f)
        })?);
    }
    if let Some(field) = trace.and_then(|t| t.field.as_ref()) {
        let title = format!("{}: {} at cycle {}", s.preset, s.filter, field.cycle);
        written.extend(write_both(dir, "field", |f| {
            render_field(field, &title, f)
        })?);
    }
    Ok(written)
}

/// Writes the RMSE/spread chart of several filters on one chart (`enff compare`) into `dir`.
pub fn write_compare_plot(
    dir: &Path,
    title: &str,
    runs: &[(String, Vec<CycleMetrics>)],
) -> Result<Vec<PathBuf>> {
    let series: Vec<(&str, &[CycleMetrics])> = runs
        .iter()
        .map(|(name, rows)| (name.as_str(), rows.as_slice()))
        .collect();
    write_both(dir, "rmse_spread", |f| render_metrics(&series, title, f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        let (t, step) = linear_ticks(0.0, 9.3, 6);
        assert_eq!(step, 2.0);
        assert_eq!(t, vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(format_tick(0.25, 0.05), "0.25");
        // Over more than two decades, the powers of ten only; over fewer, 1, 2 and 5 of each.
        assert_eq!(log_ticks(0.03, 4.0), vec![0.1, 1.0]);
        let lt = log_ticks(0.03, 0.9);
        assert_eq!(lt.len(), 4);
        for (a, b) in lt.iter().zip([0.05, 0.1, 0.2, 0.5]) {
            assert!((a - b).abs() < 1e-12, "{lt:?}");
        }
    }

    #[test]
    fn every_printable_ascii_letter_and_digit_has_a_glyph() {
        for c in ('0'..='9').chain('a'..='z').chain('A'..='Z') {
            assert!(FONT.iter().any(|(g, _)| *g == c), "no glyph for {c}");
            assert!(glyph(c).iter().any(|r| *r != 0), "blank glyph for {c}");
        }
    }

    #[test]
    fn vorticity_of_a_shear_flow() {
        // u = sin(pi y), v = 0: vorticity = -pi cos(pi y), independent of x.
        let n = 32;
        let mut s = vec![0.0f32; 3 * n * n];
        for i in 0..n {
            for j in 0..n {
                let y = 2.0 * j as f32 / n as f32;
                s[n * n + i * n + j] = (std::f32::consts::PI * y).sin();
            }
        }
        let w = vorticity(&s, n);
        for j in 0..n {
            let y = 2.0 * j as f32 / n as f32;
            let exact = -std::f32::consts::PI * (std::f32::consts::PI * y).cos();
            for i in 0..n {
                assert!((w[j * n + i] - exact).abs() < 0.05, "{j} {i}");
            }
        }
    }
}
