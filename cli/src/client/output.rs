//! What the client commands print: aligned tables, sizes, and JSON that
//! stays readable with large tensors (arrays of numbers on one line).
//!
//! Everything a command prints on stdout goes through [`print`], so a
//! closed pipe (`tensor-wasm functions ls | head -1`) ends the command
//! quietly instead of panicking.

use std::io::{self, Write};

use serde_json::Value;

/// Writes `text` to stdout.
pub fn print(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Writes `text` and a newline to stdout.
pub fn println(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Writes `value` as JSON (see [`json`]) to stdout.
pub fn print_json(value: &impl serde::Serialize) -> io::Result<()> {
    let value = serde_json::to_value(value).map_err(io::Error::other)?;
    println(&json(&value))
}

/// Columns aligned on the widest cell, two spaces apart; the last column
/// is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                s.push_str(cell);
            } else {
                s.push_str(cell);
                s.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(&mut headers.iter().copied());
    out.push('\n');
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
        out.push('\n');
    }
    out
}

/// `bytes` in binary units: `512 B`, `1.5 KiB`, `3.0 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Pretty JSON, with arrays of scalars kept on one line so that a tensor's
/// `data` reads as a row rather than a column of numbers. Still valid JSON.
pub fn json(value: &Value) -> String {
    let mut out = String::new();
    write_json(&mut out, value, 0);
    out
}

fn write_json(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            write_lines(out, indent, ('{', '}'), map.iter(), |out, (k, v)| {
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_json(out, v, indent + 1);
            });
        }
        Value::Array(items)
            if items
                .iter()
                .any(|v| matches!(v, Value::Object(_) | Value::Array(_))) =>
        {
            write_lines(out, indent, ('[', ']'), items.iter(), |out, v| {
                write_json(out, v, indent + 1)
            });
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&v.to_string());
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `open`, then each item on its own line at `indent + 1` (written by
/// `write`), commas between, then `close` on a line at `indent`.
fn write_lines<T>(
    out: &mut String,
    indent: usize,
    (open, close): (char, char),
    items: impl ExactSizeIterator<Item = T>,
    mut write: impl FnMut(&mut String, T),
) {
    let pad = |n: usize| "  ".repeat(n);
    let n = items.len();
    out.push(open);
    out.push('\n');
    for (i, item) in items.enumerate() {
        out.push_str(&pad(indent + 1));
        write(out, item);
        if i + 1 < n {
            out.push(',');
        }
        out.push('\n');
    }
    out.push_str(&pad(indent));
    out.push(close);
}

/// `t` seconds since the Unix epoch, as RFC 3339 UTC.
pub fn unix_time(t: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_on_the_widest_cell() {
        let t = table(
            &["ID", "NAME", "N"],
            &[
                vec!["f-1".into(), "digits".into(), "3".into()],
                vec!["f-22".into(), "x".into(), "10".into()],
            ],
        );
        assert_eq!(t, "ID    NAME    N\nf-1   digits  3\nf-22  x       10\n");
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn json_keeps_number_arrays_on_one_line_and_stays_json() {
        let v = serde_json::json!({
            "outputs": {"y": {"dtype": "f32", "shape": [2, 2], "data": [1.0, 3.0, "NaN", -7.0]}},
            "list": [{"a": 1}, {"b": []}],
            "empty": {}
        });
        let text = json(&v);
        assert!(
            text.contains(r#""data": [1.0, 3.0, "NaN", -7.0]"#),
            "{text}"
        );
        assert!(text.contains("\"empty\": {}"), "{text}");
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn unix_times_read_as_rfc3339() {
        assert_eq!(unix_time(0), "1970-01-01T00:00:00Z");
    }
}
