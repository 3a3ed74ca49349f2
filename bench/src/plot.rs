//! SVG charts (plotters, SVG backend only).

use plotters::prelude::*;
use std::path::Path;

type R = Result<(), String>;

fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

fn finite_max(v: impl Iterator<Item = f64>) -> f64 {
    v.filter(|x| x.is_finite()).fold(0.0, f64::max)
}

/// Box plot (p25..p75 box, p50 line, p5..p95 whiskers, max marker) plus every sample
/// as a jittered dot, one column per group.
pub fn boxplot(path: &Path, title: &str, ylabel: &str, groups: &[(String, Vec<f64>)]) -> R {
    use crate::stats::percentile;
    let n = groups.len().max(1);
    let ymax = finite_max(groups.iter().flat_map(|g| g.1.iter().copied())) * 1.08;
    let ymax = if ymax > 0.0 { ymax } else { 1.0 };
    let width = (160 * n as u32 + 160).clamp(560, 1400);
    let root = SVGBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let labels: Vec<String> = groups.iter().map(|g| g.0.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.15), 0f64..ymax)
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(n + 1)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_label_style(("sans-serif", 13))
        .y_desc(ylabel)
        .draw()
        .map_err(e)?;
    for (i, (_, s)) in groups.iter().enumerate() {
        if s.is_empty() {
            continue;
        }
        let x = i as f64;
        let c = color(i);
        let (p5, p25, p50, p75, p95) = (
            percentile(s, 5.0),
            percentile(s, 25.0),
            percentile(s, 50.0),
            percentile(s, 75.0),
            percentile(s, 95.0),
        );
        let w = 0.3;
        chart
            .draw_series([Rectangle::new(
                [(x - w, p25), (x + w, p75)],
                c.mix(0.25).filled(),
            )])
            .map_err(e)?;
        chart
            .draw_series([Rectangle::new(
                [(x - w, p25), (x + w, p75)],
                c.stroke_width(1),
            )])
            .map_err(e)?;
        for seg in [
            vec![(x - w, p50), (x + w, p50)],
            vec![(x, p75), (x, p95)],
            vec![(x, p25), (x, p5)],
            vec![(x - w / 2.0, p95), (x + w / 2.0, p95)],
            vec![(x - w / 2.0, p5), (x + w / 2.0, p5)],
        ] {
            chart
                .draw_series(LineSeries::new(seg, c.stroke_width(2)))
                .map_err(e)?;
        }
        // Deterministic jitter so the dots do not sit on one line.
        chart
            .draw_series(s.iter().enumerate().map(|(j, &y)| {
                let jit = ((j * 37 % 17) as f64 / 16.0 - 0.5) * 0.4;
                Circle::new((x + jit, y), 2, c.mix(0.6).filled())
            }))
            .map_err(e)?;
        chart
            .draw_series([Text::new(
                format!("p50 {} (n={})", fmt_num(p50), s.len()),
                (x + w + 0.02, p50),
                ("sans-serif", 12).into_font().color(&BLACK),
            )])
            .map_err(e)?;
    }
    root.present().map_err(e)
}

pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One line of a line chart; lines of one subject share a colour, dashed for a
/// secondary measure.
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: usize,
    pub dashed: bool,
}

/// Lines (with points) over a numeric x axis.
/// Values beyond `ycap` (either sign) are drawn at the edge and labelled with their
/// real value, so one noisy outlier does not flatten the rest.
pub fn lines(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Line],
    ycap: Option<f64>,
) -> R {
    let xmax = finite_max(series.iter().flat_map(|s| s.points.iter().map(|p| p.0))).max(1.0);
    let all_y = || series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let cap = ycap.unwrap_or(f64::INFINITY);
    let ymax = finite_max(all_y()).min(cap) * 1.1;
    let ymax = if ymax > 0.0 { ymax } else { 1.0 };
    let ymin = all_y()
        .filter(|y| y.is_finite())
        .fold(0.0f64, f64::min)
        .max(-cap)
        * 1.1;
    let root = SVGBackend::new(path, (860, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax * 1.03, ymin..ymax)
        .map_err(e)?;
    let clamp = |y: f64| y.clamp(ymin, ymax / 1.1);
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| {
            if ymax >= 10.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.1}")
            }
        })
        .x_desc(xlabel)
        .y_desc(ylabel)
        .draw()
        .map_err(e)?;
    for l in series {
        let c = color(l.color);
        let raw: Vec<(f64, f64)> = l
            .points
            .iter()
            .copied()
            .filter(|p| p.1.is_finite())
            .collect();
        let pts: Vec<(f64, f64)> = raw.iter().map(|p| (p.0, clamp(p.1))).collect();
        chart
            .draw_series(raw.iter().filter(|p| clamp(p.1) != p.1).map(|p| {
                Text::new(
                    format!("{} ↕", fmt_num(p.1)),
                    (p.0, clamp(p.1)),
                    ("sans-serif", 11).into_font().color(&c),
                )
            }))
            .map_err(e)?;
        let legend = move |(x, y): (i32, i32)| {
            PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
        };
        if l.dashed {
            chart
                .draw_series(DashedLineSeries::new(pts.clone(), 6, 4, c.stroke_width(2)))
                .map_err(e)?
                .label(l.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 6, y)], c.stroke_width(2))
                });
        } else {
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(e)?
                .label(l.label.clone())
                .legend(legend);
        }
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
            .map_err(e)?;
    }
    // The legend goes to the corner with the fewest points under it.
    let (y0, y1) = (ymin, ymax);
    let corners = [
        (SeriesLabelPosition::UpperRight, 0.6, 1.0, 0.7, 1.0),
        (SeriesLabelPosition::UpperLeft, 0.0, 0.4, 0.7, 1.0),
        (SeriesLabelPosition::LowerRight, 0.6, 1.0, 0.0, 0.3),
        (SeriesLabelPosition::LowerLeft, 0.0, 0.4, 0.0, 0.3),
    ];
    let xspan = xmax * 1.03;
    let under = |fx0: f64, fx1: f64, fy0: f64, fy1: f64| {
        series
            .iter()
            .flat_map(|l| l.points.iter())
            .filter(|p| p.1.is_finite())
            .filter(|p| {
                let (fx, fy) = (p.0 / xspan, (clamp(p.1) - y0) / (y1 - y0));
                fx >= fx0 && fx <= fx1 && fy >= fy0 && fy <= fy1
            })
            .count()
    };
    let pos = corners
        .into_iter()
        .min_by_key(|c| under(c.1, c.2, c.3, c.4))
        .map(|c| c.0)
        .unwrap_or(SeriesLabelPosition::UpperRight);
    chart
        .configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

/// Grouped bars: one group per category, one bar per series; a dashed line at `baseline`.
pub fn bars(
    path: &Path,
    title: &str,
    ylabel: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
    baseline: Option<f64>,
) -> R {
    let n = categories.len().max(1);
    let ymax = finite_max(series.iter().flat_map(|s| s.1.iter().copied()))
        .max(baseline.unwrap_or(0.0))
        * 1.15;
    let ymax = if ymax > 0.0 { ymax } else { 1.0 };
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax)
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(n + 1)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                categories.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(ylabel)
        .draw()
        .map_err(e)?;
    let k = series.len().max(1) as f64;
    let bw = 0.8 / k;
    for (si, (label, vals)) in series.iter().enumerate() {
        let c = color(si);
        let rects: Vec<_> = vals
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(ci, &v)| {
                let x0 = ci as f64 - 0.4 + si as f64 * bw;
                Rectangle::new([(x0, 0.0), (x0 + bw * 0.9, v)], c.filled())
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(e)?
            .label(label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        chart
            .draw_series(
                vals.iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(ci, &v)| {
                        let x0 = ci as f64 - 0.4 + si as f64 * bw;
                        Text::new(
                            fmt_num(v),
                            (x0, v + ymax * 0.045),
                            ("sans-serif", 12).into_font(),
                        )
                    }),
            )
            .map_err(e)?;
    }
    if let Some(b) = baseline {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(-0.5, b), (n as f64 - 0.5, b)],
                6,
                4,
                BLACK.stroke_width(1),
            ))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

/// A row label and its cells: (text, verdict).
pub type Cell = (String, Option<bool>);
pub type GridRow = (String, Vec<Cell>);

/// A table as a picture: rows × columns of text cells, tinted by `good` (Some(true)
/// green, Some(false) red, None grey).
pub fn grid(path: &Path, title: &str, cols: &[String], rows: &[GridRow]) -> R {
    let (cw, lw, rh) = (190i32, 170i32, 26i32);
    let w = (lw + cw * cols.len() as i32 + 20) as u32;
    let h = (60 + rh * (rows.len() as i32 + 1) + 20) as u32;
    let root = SVGBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let font = ("sans-serif", 13).into_font();
    root.draw(&Text::new(
        title.to_string(),
        (10, 12),
        ("sans-serif", 20).into_font(),
    ))
    .map_err(e)?;
    let y0 = 50;
    for (ci, c) in cols.iter().enumerate() {
        root.draw(&Text::new(
            c.clone(),
            (lw + cw * ci as i32 + 6, y0 + 6),
            font.clone(),
        ))
        .map_err(e)?;
    }
    for (ri, (label, cells)) in rows.iter().enumerate() {
        let y = y0 + rh * (ri as i32 + 1);
        root.draw(&Text::new(label.clone(), (10, y + 6), font.clone()))
            .map_err(e)?;
        for (ci, (text, good)) in cells.iter().enumerate() {
            let x = lw + cw * ci as i32;
            let fill = match good {
                Some(true) => RGBColor(200, 235, 200),
                Some(false) => RGBColor(245, 200, 200),
                None => RGBColor(235, 235, 235),
            };
            root.draw(&Rectangle::new(
                [(x, y), (x + cw - 4, y + rh - 3)],
                fill.filled(),
            ))
            .map_err(e)?;
            let t: String = text.chars().take(26).collect();
            root.draw(&Text::new(t, (x + 5, y + 6), font.clone()))
                .map_err(e)?;
        }
    }
    root.present().map_err(e)
}
