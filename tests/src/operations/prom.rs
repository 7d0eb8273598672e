//! A strict little reader of the Prometheus / OpenMetrics text exposition format, enough to
//! prove that `/metrics` parses: every sample belongs to a family declared by `# TYPE`, names
//! and labels are well-formed, values are numbers, and an OpenMetrics body ends with `# EOF`.

use std::collections::{BTreeMap, HashMap};

/// Samples by series: `name{k="v",…}` (labels sorted), or `name` without labels.
pub type Samples = HashMap<String, f64>;

/// Parses `text`; `Err` names the first offending line.
pub fn parse(text: &str) -> Result<Samples, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Samples::new();
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if eof {
            return Err(at("content after # EOF"));
        }
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut parts = rest.trim_start().splitn(3, ' ');
            match parts.next() {
                Some("EOF") => eof = true,
                Some("TYPE") => {
                    let name = parts.next().ok_or_else(|| at("TYPE without a name"))?;
                    let kind = parts.next().ok_or_else(|| at("TYPE without a type"))?;
                    if !valid_name(name) {
                        return Err(at("bad metric name"));
                    }
                    if !matches!(
                        kind,
                        "counter"
                            | "gauge"
                            | "histogram"
                            | "summary"
                            | "info"
                            | "stateset"
                            | "unknown"
                            | "gaugehistogram"
                            | "untyped"
                    ) {
                        return Err(at("unknown type"));
                    }
                    if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(at("family declared twice"));
                    }
                }
                Some("HELP") | Some("UNIT") => {
                    let name = parts.next().ok_or_else(|| at("HELP/UNIT without a name"))?;
                    if !valid_name(name) {
                        return Err(at("bad metric name"));
                    }
                }
                _ => {} // a comment
            }
            continue;
        }
        let (series, name, rest) = sample_key(line).map_err(|e| at(&e))?;
        let family =
            family_of(&name, &types).ok_or_else(|| at("sample of an undeclared family"))?;
        let kind = &types[family];
        let suffix = &name[family.len()..];
        let allowed: &[&str] = match kind.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" | "gaugehistogram" => {
                &["_bucket", "_count", "_sum", "_created", "_gcount", "_gsum"]
            }
            "summary" => &["", "_count", "_sum", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        if !allowed.contains(&suffix) {
            return Err(at(&format!("suffix {suffix:?} does not fit a {kind}")));
        }
        let mut fields = rest.split_whitespace();
        let value = fields.next().ok_or_else(|| at("no value"))?;
        let value = parse_value(value).ok_or_else(|| at("value is not a number"))?;
        if let Some(ts) = fields.next() {
            ts.parse::<f64>().map_err(|_| at("bad timestamp"))?;
        }
        if fields.next().is_some() && !rest.contains('#') {
            return Err(at("trailing fields"));
        }
        if samples.insert(series, value).is_some() {
            return Err(at("duplicate series"));
        }
    }
    if text.contains("# EOF") && !eof {
        return Err("# EOF is not on a line of its own".into());
    }
    Ok(samples)
}

/// The value of `series`, or 0 if absent (a counter that never moved).
pub fn value(samples: &Samples, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn family_of<'a>(name: &str, types: &'a HashMap<String, String>) -> Option<&'a String> {
    types
        .keys()
        .filter(|f| name.starts_with(f.as_str()))
        .max_by_key(|f| f.len())
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

/// Splits a sample line into its series key (labels sorted), its name and what follows.
fn sample_key(line: &str) -> Result<(String, String, &str), String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err("bad metric name".into());
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let close;
        loop {
            // label name
            let start = match chars.peek() {
                Some((_, '}')) => {
                    close = chars.next().map(|(i, _)| i).ok_or("unclosed labels")?;
                    break;
                }
                Some((i, _)) => *i,
                None => return Err("unclosed labels".into()),
            };
            let mut eq = None;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    eq = Some(i);
                    break;
                }
            }
            let eq = eq.ok_or("label without =")?;
            let key = &body[start..eq];
            if !valid_name(key) || key.contains(':') {
                return Err(format!("bad label name {key:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        _ => return Err("bad escape in a label value".into()),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            }
            if labels.insert(key.to_owned(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            match chars.peek() {
                Some((_, ',')) => {
                    chars.next();
                }
                Some((_, '}')) => {}
                _ => return Err("expected , or } after a label".into()),
            }
        }
        rest = &body[close + 1..];
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let series = if labels.is_empty() {
        name.to_owned()
    } else {
        let inner: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect();
        format!("{name}{{{}}}", inner.join(","))
    };
    Ok((series, name.to_owned(), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_good_text_and_refuses_bad() {
        let good = "# HELP a_total x\n# TYPE a counter\na_total{z=\"1\",b=\"q\\\"\"} 3\n\
                    # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 2\nh_sum 0.5\n# EOF\n";
        let s = parse(good).expect("parses");
        assert_eq!(value(&s, "a_total{b=\"q\\\"\",z=\"1\"}"), 3.0);
        assert_eq!(value(&s, "h_count"), 2.0);
        for bad in [
            "x 1\n",                             // undeclared
            "# TYPE a counter\na 1\n",           // counter without _total
            "# TYPE a gauge\na{b=1} 1\n",        // unquoted label
            "# TYPE a gauge\na one\n",           // not a number
            "# TYPE a gauge\na 1\n# EOF\na 2\n", // after EOF
            "# TYPE a gauge\na 1\na 2\n",        // duplicate series
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
