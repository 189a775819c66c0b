//! The Prometheus text exposition (`/metrics` of the proxy and the
//! executors), read as far as the canary and the verification need: each
//! sample's name, labels and value. Comments, types and timestamps are
//! skipped; a line that does not parse is skipped too (the canary then sees
//! fewer requests, never invented ones).

/// One sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample of `text`.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(sample).collect()
}

fn sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, after) = labels(&line[open + 1..])?;
            (&line[..open], labels, after)
        }
        None => {
            let end = line.find(char::is_whitespace)?;
            (&line[..end], Vec::new(), &line[end..])
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `a="x",b="y"}` and what follows the `}`.
fn labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((out, rest));
        }
        let eq = s.find('=')?;
        let name = s[..eq].trim().to_string();
        s = s[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((name, value));
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_and_without_labels() {
        let text = "# HELP x y\n# TYPE x counter\n\
                    tensor_wasm_upstream_requests_total{executor=\"cpu0.1\",status=\"500\"} 7\n\
                    tensor_wasm_http_requests_in_flight 3\n\
                    h_bucket{le=\"+Inf\",odd=\"a\\\"b\"} 12 1700000000\n\
                    broken{le=\"0.1\" 3\n";
        let s = parse(text);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].label("executor"), Some("cpu0.1"));
        assert_eq!(s[0].label("status"), Some("500"));
        assert_eq!(s[0].value, 7.0);
        assert_eq!(s[1].name, "tensor_wasm_http_requests_in_flight");
        assert!(s[1].labels.is_empty());
        assert_eq!(s[2].label("le"), Some("+Inf"));
        assert_eq!(s[2].label("odd"), Some("a\"b"));
        assert_eq!(s[2].value, 12.0);
    }
}
