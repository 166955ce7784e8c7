//! The loss-curve plot `recipec train` writes (`loss.svg`): training loss per logged step,
//! validation loss at its cadence, and a dashed line for the unigram baseline. Plain SVG,
//! no dependencies; the bytes depend only on the numbers.

/// One series: name, colour, points `(step, value)`.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: &'a [(f64, f64)],
}

fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= n as f64).unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = vec![];
    while t <= hi + 1e-9 * span {
        out.push(t);
        t += step;
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// An SVG line chart of `series` with an optional horizontal reference line.
pub fn svg(title: &str, series: &[Series], reference: Option<(&str, f64)>) -> String {
    let (w, h) = (720.0, 420.0);
    let (l, r, t, b) = (64.0, 20.0, 40.0, 48.0);
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if let Some((_, v)) = reference {
        y0 = y0.min(v);
        y1 = y1.max(v);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let (y0, y1) = ((y0 - pad).max(0.0), y1 + pad);
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let sy = |y: f64| t + (1.0 - (y - y0) / (y1 - y0)) * (h - t - b);
    let mut o = String::new();
    o.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    ));
    o.push_str(&format!("<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"));
    o.push_str(&format!("<text x=\"{}\" y=\"24\" font-size=\"15\">{}</text>\n", l, esc(title)));
    for y in nice_ticks(y0, y1, 6) {
        let py = sy(y);
        o.push_str(&format!(
            "<line x1=\"{l}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            w - r,
            l - 6.0,
            py + 4.0,
            format!("{y:.2}")
        ));
    }
    for x in nice_ticks(x0, x1, 8) {
        let px = sx(x);
        o.push_str(&format!(
            "<line x1=\"{px:.1}\" y1=\"{t}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/><text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            h - b,
            h - b + 16.0,
            x.round()
        ));
    }
    o.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">step</text>\n<text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">loss (nats/token)</text>\n",
        (l + w - r) / 2.0,
        h - 8.0,
        (t + h - b) / 2.0,
        (t + h - b) / 2.0
    ));
    if let Some((name, v)) = reference {
        let py = sy(v);
        o.push_str(&format!(
            "<line x1=\"{l}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#888\" stroke-dasharray=\"6 4\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555\">{} {v:.3}</text>\n",
            w - r,
            w - r - 4.0,
            py - 5.0,
            esc(name)
        ));
    }
    for (i, s) in series.iter().enumerate() {
        let d: Vec<String> =
            s.points.iter().filter(|p| p.1.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        if !d.is_empty() {
            o.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                s.color,
                d.join(" ")
            ));
        }
        let ly = t + 14.0 + 16.0 * i as f64;
        o.push_str(&format!(
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{}\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            w - r - 150.0,
            w - r - 130.0,
            s.color,
            w - r - 124.0,
            ly + 4.0,
            esc(s.name)
        ));
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_has_both_series_and_the_baseline() {
        let a = [(1.0, 5.5), (10.0, 3.0), (20.0, 2.5)];
        let b = [(10.0, 3.1), (20.0, 2.6)];
        let s = svg(
            "tiny <gpt>",
            &[
                Series { name: "train", color: "#1f77b4", points: &a },
                Series { name: "validation", color: "#d62728", points: &b },
            ],
            Some(("unigram", 3.05)),
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("tiny &lt;gpt&gt;") && s.contains("unigram 3.050"));
        assert_eq!(
            s,
            svg(
                "tiny <gpt>",
                &[
                    Series { name: "train", color: "#1f77b4", points: &a },
                    Series { name: "validation", color: "#d62728", points: &b }
                ],
                Some(("unigram", 3.05))
            )
        );
    }
}
