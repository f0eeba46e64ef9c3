//! Plots drawn by cohort itself, as SVG (no plotting dependency).

/// Held-out accuracy per round as a line, with the centralised model's accuracy as a dashed
/// horizontal line.
pub fn accuracy_svg(title: &str, points: &[(f64, f64)], centralised: Option<f64>) -> String {
    let (w, h) = (640.0, 400.0);
    let (left, right, top, bottom) = (60.0, 20.0, 40.0, 50.0);
    let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let lo = points
        .iter()
        .map(|p| p.1)
        .chain(centralised)
        .fold(1.0, f64::min);
    let min_y = ((lo * 10.0).floor() / 10.0).clamp(0.0, 0.9);
    let x = |v: f64| left + (v / max_x) * (w - left - right);
    let y = |v: f64| top + (1.0 - (v - min_y) / (1.0 - min_y)) * (h - top - bottom);
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        w / 2.0,
        esc(title)
    );
    // Axes, grid and tick labels.
    let steps = 5;
    for i in 0..=steps {
        let v = min_y + (1.0 - min_y) * i as f64 / steps as f64;
        s += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y0:.1}\" y2=\"{y0:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>\n",
            w - right,
            left - 6.0,
            y(v) + 4.0,
            y0 = y(v)
        );
    }
    let xticks = (max_x as usize).clamp(1, 10);
    for i in 0..=xticks {
        let v = max_x * i as f64 / xticks as f64;
        s += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            x(v),
            h - bottom + 18.0,
            v.round()
        );
    }
    s += &format!(
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{}\" stroke=\"black\"/>\
         <line x1=\"{left}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">round</text>\
         <text transform=\"translate(16 {}) rotate(-90)\" text-anchor=\"middle\">held-out accuracy</text>\n",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom,
        (left + w - right) / 2.0,
        h - 12.0,
        (top + h - bottom) / 2.0
    );
    if let Some(c) = centralised {
        s += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yc:.1}\" y2=\"{yc:.1}\" stroke=\"#d62728\" stroke-dasharray=\"6 4\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#d62728\">centralised {c:.3}</text>\n",
            w - right,
            w - right - 4.0,
            y(c) - 6.0,
            yc = y(c)
        );
    }
    let path: Vec<String> = points
        .iter()
        .map(|&(a, b)| format!("{:.1},{:.1}", x(a), y(b)))
        .collect();
    s += &format!(
        "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n",
        path.join(" ")
    );
    for &(a, b) in points {
        s += &format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#1f77b4\"/>\n",
            x(a),
            y(b)
        );
    }
    if let Some(&(a, b)) = points.last() {
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#1f77b4\">federated {b:.3}</text>\n",
            x(a) - 4.0,
            y(b) + 16.0
        );
    }
    s + "</svg>\n"
}

#[cfg(test)]
mod tests {
    #[test]
    fn svg_has_points_and_baseline() {
        let svg = super::accuracy_svg("a <b>", &[(1.0, 0.5), (2.0, 0.8)], Some(0.85));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("centralised 0.850") && svg.contains("a &lt;b&gt;"));
    }
}
