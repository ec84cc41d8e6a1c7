//! Interactive SVG flamegraphs drawn by `inferno` from folded stacks: the memory palette,
//! widths in bytes, and differential graphs (growth red, shrink blue) for `tracer diff`.
use std::io::Write;

use inferno::flamegraph::{
    self,
    color::{BasicPalette, Palette},
};

use super::{
    Report,
    folded::{Metric, folded},
    text::human_bytes,
};

fn options(title: String, subtitle: String) -> flamegraph::Options<'static> {
    let mut opts = flamegraph::Options::default();
    opts.colors = Palette::Basic(BasicPalette::Mem);
    // Colors from a stable hash of the name: the same input always gives the same picture.
    opts.deterministic = true;
    opts.title = title;
    opts.subtitle = Some(subtitle);
    opts.count_name = "bytes".to_owned();
    opts.name_type = "Function:".to_owned();
    opts
}

/// A flamegraph of `report`'s stacks weighed by `metric`.
pub fn write(report: &Report, metric: Metric, out: &mut dyn Write) -> std::io::Result<()> {
    let lines: Vec<String> = folded(report, metric)
        .into_iter()
        .map(|(stack, bytes)| format!("{stack} {bytes}"))
        .collect();
    let total: u64 = report.stacks.iter().map(|s| metric.of(s)).sum();
    let title = format!(
        "{} (pid {}): {}",
        report.command,
        report.pid,
        metric.describe()
    );
    let subtitle = format!(
        "{} ({total} B) in {} of {} stacks, recorded {:.1} s",
        human_bytes(total),
        report.stacks.len(),
        report.stacks_total,
        report.duration_ms as f64 / 1000.0
    );
    render(&title, subtitle, &lines, out)
}

/// A differential flamegraph: `lines` are `stack BEFORE AFTER`; widths are the AFTER bytes,
/// red where a stack grew and blue where it shrank.
pub fn write_diff(
    title: &str,
    subtitle: String,
    lines: &[String],
    out: &mut dyn Write,
) -> std::io::Result<()> {
    render(title, subtitle, lines, out)
}

fn render(
    title: &str,
    subtitle: String,
    lines: &[String],
    out: &mut dyn Write,
) -> std::io::Result<()> {
    if lines.is_empty() {
        // inferno draws an error picture for empty input; say what is really the case.
        return write_empty(title, &subtitle, out);
    }
    let mut opts = options(title.to_owned(), subtitle);
    flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), out)
}

fn write_empty(title: &str, subtitle: &str, out: &mut dyn Write) -> std::io::Result<()> {
    write!(
        out,
        "<?xml version=\"1.0\" standalone=\"no\"?>\n\
         <svg version=\"1.1\" width=\"1200\" height=\"90\" xmlns=\"http://www.w3.org/2000/svg\">\n\
         <rect x=\"0\" y=\"0\" width=\"100%\" height=\"100%\" fill=\"rgb(248,248,248)\"/>\n\
         <text x=\"600\" y=\"24\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"17\">{}</text>\n\
         <text x=\"600\" y=\"48\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"12\">{}</text>\n\
         <text x=\"600\" y=\"72\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"12\">no stack has any bytes to draw</text>\n\
         </svg>\n",
        escape(title),
        escape(subtitle)
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::folded::tests::{frame, report, stack};

    #[test]
    fn draws_the_stacks_with_title_and_byte_counts() {
        let r = report(vec![stack(
            3 << 20,
            3 << 20,
            vec![
                frame(Some("calloc"), Some("/lib/libc.so.6"), 1),
                frame(Some("keep<&>"), Some("/a"), 2),
            ],
        )]);
        let mut out = Vec::new();
        write(&r, Metric::Live, &mut out).unwrap();
        let svg = String::from_utf8(out).unwrap();
        assert!(svg.starts_with("<?xml"), "{}", &svg[..200]);
        assert!(svg.contains("app (pid 7): live bytes"), "title");
        assert!(
            svg.contains("keep&lt;&amp;&gt; (3,145,728 bytes, 100.00%)"),
            "frame with count"
        );
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn nothing_to_draw_is_said_in_a_valid_svg() {
        let r = report(vec![stack(0, 10, vec![frame(Some("f"), Some("/a"), 1)])]);
        let mut out = Vec::new();
        write(&r, Metric::Live, &mut out).unwrap();
        let svg = String::from_utf8(out).unwrap();
        assert!(svg.contains("no stack has any bytes to draw"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
