//! The SVG chart: p99 latency and traffic share per backend over time.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use towline::BoxError;

use crate::timeline::Bucket;
use crate::{BUCKET, PhaseResult, StrategyName};

/// A chart of p99 latency and traffic share per backend over time, phases marked: two panels
/// sharing the time axis. Text is written as SVG `<text>` (plotters without font features).
pub(crate) fn draw_chart(
    path: &Path,
    results: &[PhaseResult],
    buckets: &[Bucket],
    backend_ids: &[String],
    strategy: StrategyName,
) -> Result<(), BoxError> {
    let end = results.last().map_or(1.0, |r| r.end).max(1.0);
    let root = SVGBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "towline tour: p99 latency and traffic share per backend ({}, {} ms buckets)",
            strategy.as_str(),
            BUCKET.as_millis()
        ),
        ("sans-serif", 22),
    )?;
    let (top, bottom) = root.split_vertically(400);
    let color = |b: usize| Palette99::pick(b).to_rgba();

    // Latency panel, log scale (calls of a millisecond next to the slowed backend's 20 ms),
    // spanning what was measured with room above and below.
    let p99s_ms: Vec<f64> = buckets
        .iter()
        .flat_map(|b| std::iter::once(b.p99).chain(b.backends.iter().filter_map(|(_, p)| *p)))
        .map(|p| p.as_secs_f64() * 1e3)
        .filter(|ms| *ms > 0.0)
        .collect();
    let y_min = (p99s_ms.iter().copied().fold(f64::INFINITY, f64::min) / 2.0).clamp(0.01, 0.5);
    let y_max = (p99s_ms.iter().copied().fold(0.0, f64::max) * 2.0).max(1.0);
    let mut latency = ChartBuilder::on(&top)
        .margin(10)
        .margin_top(30)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end, (y_min..y_max).log_scale())?;
    latency
        .configure_mesh()
        .x_desc("seconds since the first phase")
        .x_label_formatter(&|s| format!("{s:.0}"))
        .y_desc("p99 latency (ms, log)")
        .y_label_formatter(&|v| format!("{v}"))
        .draw()?;
    for (b, id) in backend_ids.iter().enumerate() {
        // A backend without calls in a bucket has no p99 there: draw each run of buckets apart,
        // so the line breaks instead of bridging the gap.
        let points: Vec<Option<(f64, f64)>> = buckets
            .iter()
            .map(|k| {
                k.backends[b]
                    .1
                    .map(|p| (k.start, (p.as_secs_f64() * 1e3).max(y_min)))
            })
            .collect();
        let mut labelled = false;
        for run in points.split(Option::is_none).filter(|run| !run.is_empty()) {
            let series = latency.draw_series(LineSeries::new(
                run.iter().flatten().copied(),
                color(b).stroke_width(2),
            ))?;
            if !labelled {
                series.label(id.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color(b).stroke_width(2))
                });
                labelled = true;
            }
        }
    }
    latency
        .draw_series(LineSeries::new(
            buckets
                .iter()
                .map(|k| (k.start, (k.p99.as_secs_f64() * 1e3).max(y_min))),
            BLACK.stroke_width(1),
        ))?
        .label("every call (caller's view)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    mark_phases(&mut latency, results, (y_min, y_max), true)?;
    // Top right: above the recovered phases' latencies, below the slow phase's peak.
    latency
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;

    // Share panel: of each bucket's calls, the percentage each backend answered and that failed.
    let mut share = ChartBuilder::on(&bottom)
        .margin(10)
        .margin_top(30)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end, 0.0..105.0)?;
    share
        .configure_mesh()
        .x_desc("seconds since the first phase")
        .x_label_formatter(&|s| format!("{s:.0}"))
        .y_label_formatter(&|s| format!("{s:.0}"))
        .y_desc("share of calls (%)")
        .draw()?;
    for (b, id) in backend_ids.iter().enumerate() {
        share
            .draw_series(LineSeries::new(
                buckets.iter().map(|k| (k.start, k.share(b))),
                color(b).stroke_width(2),
            ))?
            .label(id.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color(b).stroke_width(2))
            });
    }
    let grey = RGBColor(140, 140, 140);
    share
        .draw_series(LineSeries::new(
            buckets.iter().map(|k| (k.start, k.failed_share())),
            grey.stroke_width(2),
        ))?
        .label("failed")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(2)));
    mark_phases(&mut share, results, (0.0, 105.0), false)?;
    share
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Draws a vertical line at each phase's start and, if `named`, the phase's name above it.
pub(crate) fn mark_phases<DB, Y>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    results: &[PhaseResult],
    (y_low, y_high): (f64, f64),
    named: bool,
) -> Result<(), BoxError>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64>,
{
    let line = RGBColor(60, 60, 60);
    for result in results {
        chart.draw_series(DashedLineSeries::new(
            [(result.start, y_low), (result.start, y_high)],
            6,
            4,
            line.stroke_width(1),
        ))?;
        if named {
            // Just above the plot, centred over the phase.
            let middle = (result.start + result.end) / 2.0;
            let style = ("sans-serif", 13)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Bottom));
            chart
                .plotting_area()
                .draw(&Text::new(result.phase.name(), (middle, y_high), style))?;
        }
    }
    Ok(())
}
