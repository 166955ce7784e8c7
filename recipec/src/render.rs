//! Rendering diagnostics: miette reports for people, JSON lines for tools.

use lang::diag::{Diagnostic, Severity};
use lang::source::SourceDb;
use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, MietteDiagnostic, NamedSource};

/// Renders one diagnostic as text. Labels in other files than the primary one become notes
/// with their `file:line:column`.
pub fn render(db: &SourceDb, d: &Diagnostic, color: bool) -> String {
    let Some(primary) = d.primary() else {
        return format!("{}[{}]: {}\n", d.severity.as_str(), d.code, d.message);
    };
    let file = db.file(primary.file);
    let mut labels = vec![];
    let mut notes = d.notes.clone();
    for (i, l) in d.labels.iter().enumerate() {
        if l.file == primary.file {
            let start = (l.span.start as usize).min(file.text.len());
            let len = (l.span.end.saturating_sub(l.span.start) as usize).min(file.text.len() - start);
            let ls = if i == 0 {
                LabeledSpan::new_primary_with_span(Some(l.message.clone()), (start, len))
            } else {
                LabeledSpan::new_with_span(Some(l.message.clone()), (start, len))
            };
            labels.push(ls);
        } else {
            let other = db.file(l.file);
            let (line, col) = other.line_col(l.span.start);
            notes.push(format!("{} ({}:{line}:{col})", l.message, other.name));
        }
    }
    let mut md = MietteDiagnostic::new(d.message.clone())
        .with_code(d.code)
        .with_severity(match d.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        })
        .with_labels(labels);
    if let Some(help) = &d.help {
        md = md.with_help(help.clone());
    }
    let report = miette::Report::new(md).with_source_code(NamedSource::new(file.name.clone(), file.text.clone()));
    let theme = if color { GraphicalTheme::unicode() } else { GraphicalTheme::unicode_nocolor() };
    let handler = GraphicalReportHandler::new_themed(theme).with_width(100).with_links(false);
    let mut out = String::new();
    if handler.render_report(&mut out, report.as_ref()).is_err() {
        out = format!("{}[{}]: {}\n", d.severity.as_str(), d.code, d.message);
    }
    for n in &notes {
        out.push_str(&format!("  = note: {n}\n"));
    }
    out
}

/// One JSON object per diagnostic: file, line, column (1-based), code, severity, message.
pub fn json(db: &SourceDb, d: &Diagnostic) -> String {
    let (file, line, column, end_line, end_column) = match d.primary() {
        Some(l) => {
            let f = db.file(l.file);
            let (line, col) = f.line_col(l.span.start);
            let (el, ec) = f.line_col(l.span.end);
            (f.name.clone(), line, col, el, ec)
        }
        None => (String::new(), 0, 0, 0, 0),
    };
    serde_json::json!({
        "file": file,
        "line": line,
        "column": column,
        "end_line": end_line,
        "end_column": end_column,
        "code": d.code,
        "severity": d.severity.as_str(),
        "message": d.message,
        "help": d.help,
    })
    .to_string()
}
