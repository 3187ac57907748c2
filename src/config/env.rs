//! Settings from the environment: `MODRUN_<SECTION>__<KEY>=value` sets `<section>.<key>` (and
//! `MODRUN_SERVER__TLS__CERT` the nested `server.tls.cert`) over what the file says, so a
//! container needs no edited config file. Applied to the parsed file before it is validated,
//! so an overridden value is checked exactly as one written in the file; an error names the
//! variable.

use std::ffi::OsString;

use super::KeyError;

/// The prefix of every override variable.
const PREFIX: &str = "MODRUN_";

/// Between the parts of a key (`MODRUN_RUNNER__MAX_CONCURRENT`).
const SEPARATOR: &str = "__";

/// An override that was applied: the dotted key it set and the variable it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Override {
    /// `runner.max_concurrent`.
    pub(super) key: String,
    /// `MODRUN_RUNNER__MAX_CONCURRENT`.
    pub(super) var: String,
}

/// Apply every `MODRUN_…__…` variable among `vars` to `doc`. Variables without the double
/// underscore (`MODRUN_BIND`, `MODRUN_STORAGE_URL`, …) are not overrides and are left alone.
///
/// A value is read as a TOML value when it is one (`8`, `true`, `"text"`, `["PATH", "HOME"]`,
/// `{ from_env = "DB_URL" }`) and as a plain string otherwise (`0.0.0.0:8080`, `30s`); quote it
/// to force a string. Setting `storage.path` or `storage.url` drops the other one from the file
/// (they exclude each other). Modules are declared in the file only.
pub(super) fn apply(
    doc: &mut toml::Table,
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<Vec<Override>, KeyError> {
    let mut applied = Vec::new();
    let mut vars: Vec<(String, OsString)> = vars
        .into_iter()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v)))
        .filter(|(k, _)| k.starts_with(PREFIX) && k.contains(SEPARATOR))
        .collect();
    // In name order: the result does not depend on the environment's order.
    vars.sort();
    for (var, value) in vars {
        let env_key = || format!("{var} (environment)");
        let parts: Vec<String> = var[PREFIX.len()..]
            .split(SEPARATOR)
            .map(str::to_ascii_lowercase)
            .collect();
        if parts.iter().any(|p| {
            p.is_empty()
                || !p
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        }) {
            return Err((
                env_key(),
                "is not a setting: write MODRUN_<SECTION>__<KEY> (letters, digits and single underscores between the double ones)".into(),
            ));
        }
        if parts[0] == "modules" {
            return Err((
                env_key(),
                "modules are declared in the config file; the environment sets the other sections' keys".into(),
            ));
        }
        let value = value
            .into_string()
            .map_err(|_| (env_key(), "is not UTF-8".to_owned()))?;
        let value = parse_value(&value);
        let key = parts.join(".");
        if parts.len() == 2 && parts[0] == "storage" {
            let other = match parts[1].as_str() {
                "path" => Some("url"),
                "url" => Some("path"),
                _ => None,
            };
            if let (Some(other), Some(toml::Value::Table(storage))) =
                (other, doc.get_mut("storage"))
            {
                storage.remove(other);
            }
        }
        set(doc, &parts, value).map_err(|m| (env_key(), m))?;
        applied.push(Override { key, var });
    }
    Ok(applied)
}

/// `text` as a TOML value when it is exactly one, else as a string.
fn parse_value(text: &str) -> toml::Value {
    // Parsed as the only key of a document: text that holds more than one value (a line break
    // and another key) is not a value, and stays a string.
    let doc = format!("v = {text}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) if t.len() == 1 => t.remove("v").unwrap_or_else(|| text.into()),
        _ => toml::Value::String(text.to_owned()),
    }
}

/// Set `doc.<parts…>` to `value`, making the tables on the way.
fn set(doc: &mut toml::Table, parts: &[String], value: toml::Value) -> Result<(), String> {
    let (last, path) = parts.split_last().expect("at least one part");
    let mut table = doc;
    for (i, p) in path.iter().enumerate() {
        let entry = table
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(format!(
                    "`{}` is not a table in the config file, so it has no `{}`",
                    parts[..=i].join("."),
                    parts[i + 1]
                ));
            }
        };
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        list.iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    /// Values are TOML when they parse as one value, strings otherwise.
    #[test]
    fn values_are_toml_or_strings() {
        assert_eq!(parse_value("8"), toml::Value::Integer(8));
        assert_eq!(parse_value("true"), toml::Value::Boolean(true));
        assert_eq!(parse_value("0.0.0.0:8080"), "0.0.0.0:8080".into());
        assert_eq!(parse_value("30s"), "30s".into());
        assert_eq!(parse_value("\"8\""), "8".into());
        assert_eq!(
            parse_value("[\"PATH\", \"HOME\"]"),
            toml::Value::Array(vec!["PATH".into(), "HOME".into()])
        );
        // Not a way to set a second key.
        assert_eq!(parse_value("1\nother = 2"), "1\nother = 2".into());
    }

    /// Only MODRUN_ variables with a double underscore are overrides; nested keys make tables.
    #[test]
    fn overrides_set_nested_keys_and_leave_other_variables_alone() {
        let mut doc: toml::Table = "[runner]\nmax_concurrent = 2\n".parse().unwrap();
        let applied = apply(
            &mut doc,
            vars(&[
                ("MODRUN_RUNNER__MAX_CONCURRENT", "8"),
                ("MODRUN_SERVER__TLS__CERT", "cert.pem"),
                ("MODRUN_BIND", "0.0.0.0:1"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(doc["runner"]["max_concurrent"], toml::Value::Integer(8));
        assert_eq!(doc["server"]["tls"]["cert"], "cert.pem".into());
        assert_eq!(applied.len(), 2);
        assert_eq!(applied[0].key, "runner.max_concurrent");
        assert!(!doc.contains_key("bind"));
    }

    /// storage.url from the environment replaces the file's storage.path, and modules cannot
    /// be set.
    #[test]
    fn storage_choice_and_modules() {
        let mut doc: toml::Table = "[storage]\npath = \"data\"\n".parse().unwrap();
        apply(
            &mut doc,
            vars(&[("MODRUN_STORAGE__URL", "postgres://db/x")]),
        )
        .unwrap();
        assert!(!doc["storage"].as_table().unwrap().contains_key("path"));
        let err = apply(&mut doc, vars(&[("MODRUN_MODULES__ID", "x")])).unwrap_err();
        assert!(err.0.starts_with("MODRUN_MODULES__ID"), "{err:?}");
        let err = apply(&mut doc, vars(&[("MODRUN_RUNNER____X", "1")])).unwrap_err();
        assert!(err.1.contains("MODRUN_<SECTION>__<KEY>"), "{err:?}");
    }
}
