//! Charts for the pages, drawn on the server as SVG with plotters' SVG backend: no script
//! library in the browser, nothing fetched from anywhere. Colours fit the pages' dark
//! background; the text uses the pages' font stack (CJK included, see `lobby.rs`).

use plotters::prelude::*;

/// The pages' font stack, for the charts' labels.
const FONT: &str = "Noto Sans CJK SC, WenQuanYi Micro Hei, WenQuanYi Zen Hei, sans-serif";
const TEXT: RGBColor = RGBColor(0xd8, 0xde, 0xe9);
const GRID: RGBColor = RGBColor(0x3b, 0x42, 0x52);
const PALETTE: [RGBColor; 8] = [
    RGBColor(0x88, 0xc0, 0xd0),
    RGBColor(0xeb, 0xcb, 0x8b),
    RGBColor(0xa3, 0xbe, 0x8c),
    RGBColor(0xbf, 0x61, 0x6a),
    RGBColor(0xb4, 0x8e, 0xad),
    RGBColor(0xd0, 0x87, 0x70),
    RGBColor(0x8f, 0xbc, 0xbb),
    RGBColor(0x5e, 0x81, 0xac),
];

/// One line of a chart: its legend label and a value per x position (`None`: not drawn).
pub(super) struct Series<'a> {
    pub label: &'a str,
    pub values: Vec<Option<f64>>,
    /// Drawn thin and dashed-looking (a comparison line).
    pub faint: bool,
}

/// A line chart of `series` over x positions labelled `x_labels`, `width` x `height`
/// pixels (the SVG scales with its container).
pub(super) fn lines(
    series: &[Series],
    x_labels: &[String],
    width: u32,
    height: u32,
    text_px: u32,
) -> String {
    let mut svg = String::new();
    if let Err(e) = draw(&mut svg, series, x_labels, (width, height), text_px) {
        tracing::debug!(error = %e, "chart not drawn");
        return String::new();
    }
    // Scale with the page (plotters writes the viewBox too): no fixed size.
    svg.replacen(&format!(r#"width="{width}" height="{height}" "#), "", 1)
}

fn draw(
    svg: &mut String,
    series: &[Series],
    x_labels: &[String],
    size: (u32, u32),
    text_px: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(svg, size).into_drawing_area();
    let n = x_labels.len().max(1);
    // Finite and bounded: plotters loops forever on an infinite range.
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .filter(|v| v.is_finite())
        .fold(0.0f64, |a, &b| a.max(b))
        .min(1e300);
    let top = if top <= 0.0 { 1.0 } else { top * 1.15 };
    let font = || (FONT, text_px as f64).into_font().color(&TEXT);
    let mut chart = ChartBuilder::on(&root)
        .margin(text_px)
        .x_label_area_size(text_px * 2)
        .y_label_area_size(text_px * 3)
        .build_cartesian_2d(0..n as i32 - 1, 0.0..top)?;
    chart
        .configure_mesh()
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .axis_style(GRID)
        .x_labels(n.min(12))
        .y_labels(5)
        .x_label_formatter(&|x| {
            x_labels
                .get(usize::try_from(*x).unwrap_or(0))
                .cloned()
                .unwrap_or_default()
        })
        .y_label_formatter(&|y| match top {
            t if t >= 5.0 => format!("{y:.0}"),
            _ => format!("{y:.1}"),
        })
        .label_style(font())
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let style = match s.faint {
            true => colour.mix(0.6).stroke_width((text_px / 8).max(2)),
            false => colour.stroke_width((text_px / 4).max(3)),
        };
        let points: Vec<(i32, f64)> = s
            .values
            .iter()
            .enumerate()
            .filter_map(|(x, v)| v.map(|v| (x as i32, v)))
            .collect();
        chart
            .draw_series(LineSeries::new(points, style))?
            .label(s.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 30, y)], colour.stroke_width(4))
            });
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(font())
            .background_style(RGBColor(0x2e, 0x34, 0x40).mix(0.8))
            .border_style(GRID)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_one_scalable_svg_with_its_labels() {
        let hours: Vec<String> = (0..24).map(|h| format!("{h:02}")).collect();
        let svg = lines(
            &[
                Series {
                    label: "今天",
                    values: (0..24).map(|h| (h < 10).then_some(h as f64)).collect(),
                    faint: false,
                },
                Series {
                    label: "last week",
                    values: (0..24).map(|h| Some(h as f64 / 2.0)).collect(),
                    faint: true,
                },
            ],
            &hours,
            1600,
            500,
            28,
        );
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains(r#"viewBox="0 0 1600 500""#));
        assert!(
            !svg.contains(r#"width="1600""#),
            "scales with its container"
        );
        assert!(svg.contains("今天") && svg.contains("last week"));
        assert_eq!(svg.matches("<svg").count(), 1);
        // Nothing to draw: still a chart (an empty one), never a panic.
        let empty = lines(&[], &[], 400, 200, 12);
        assert!(empty.starts_with("<svg"));
        // Values beyond any scale: drawn within bounds, never a hang.
        let huge = lines(
            &[Series {
                label: "x",
                values: vec![
                    Some(f64::MAX),
                    Some(f64::INFINITY),
                    Some(f64::NAN),
                    Some(1.0),
                ],
                faint: false,
            }],
            &["a".into(), "b".into(), "c".into(), "d".into()],
            400,
            200,
            12,
        );
        assert!(huge.starts_with("<svg"));
    }
}
