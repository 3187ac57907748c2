//! The module catalog: what an operator declared (program, fixed args, cwd, env, typed
//! parameters, limits), how a request's parameters are validated against it, and how valid
//! parameters become argv and environment. No I/O.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use regex::Regex;
use serde_json::{Map, Value};

/// One operator-declared module.
#[derive(Debug, Clone)]
pub struct Module {
    /// `[a-z0-9][a-z0-9_-]{0,63}`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// What it does.
    pub description: Option<String>,
    /// Program and fixed args (secret ones resolved); never run through a shell by modrun.
    pub command: Vec<String>,
    /// Absolute working directory.
    pub cwd: PathBuf,
    /// Extra environment for the child (values resolved).
    pub env: BTreeMap<String, String>,
    /// The secret values among `command` and `env` (from the server's environment, a file, or
    /// marked secret): masked in a run's argv and output.
    pub secrets: Vec<String>,
    /// The module's own timeout, if it sets one.
    pub timeout: Option<Duration>,
    /// Per-module concurrency limit, within the global one.
    pub max_concurrent: Option<NonZeroUsize>,
    /// Typed parameters in declaration order.
    pub parameters: Vec<Parameter>,
    /// Put `--` between the options and the positional parameters.
    pub end_of_options: bool,
    /// Resource limits of its runs.
    pub limits: Limits,
    /// The user its runs execute as (`None`: modrun's own).
    pub run_as: Option<RunAs>,
    /// In a cluster: a run whose node is lost is queued again (a new attempt) instead of
    /// `lost`.
    pub retry_on_lost: bool,
    /// Attempts at most, the first included (1 unless `retry_on_lost`).
    pub max_attempts: u32,
    /// URLs told (signed POST of the run) when a run of it ends.
    pub callbacks: Vec<String>,
}

/// Per-module resource limits, set in the child before exec (`setrlimit`; see the README for
/// what each one measures).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Address space (`RLIMIT_AS`), in bytes.
    pub memory: Option<u64>,
    /// CPU time (`RLIMIT_CPU`): SIGXCPU, then SIGKILL a second later.
    pub cpu: Option<Duration>,
    /// Open files (`RLIMIT_NOFILE`).
    pub open_files: Option<u64>,
    /// Processes of the run's user (`RLIMIT_NPROC`; not enforced for root).
    pub processes: Option<u64>,
    /// Largest file it may write (`RLIMIT_FSIZE`): SIGXFSZ past it.
    pub file_size: Option<u64>,
}

/// A user (and group) a module's runs execute as; only when modrun runs as root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The user's name, as configured.
    pub user: String,
    /// Its uid.
    pub uid: u32,
    /// The group's gid (the `group` key, else the user's primary group).
    pub gid: u32,
}

/// A typed parameter of a module.
#[derive(Debug, Clone)]
pub struct Parameter {
    /// `[a-z0-9_]{1,64}`.
    pub name: String,
    /// Type and its constraints.
    pub kind: ParamKind,
    /// Whether a request must give it.
    pub required: bool,
    /// Used when the request omits it (already checked against `kind`).
    pub default: Option<Value>,
    /// What it means.
    pub description: Option<String>,
    /// How the value reaches the child.
    pub passing: Passing,
    /// The value is a secret: passed by env or stdin only (argv is readable by every local
    /// user), shown as `***` in the run, masked in its output.
    pub secret: bool,
}

impl Parameter {
    /// Checks that depend on how the value reaches the child: an environment string
    /// (`NAME=value`) must fit the kernel's limit for one string too.
    fn check_passing(&self, value: &Value) -> Result<(), String> {
        if let (Passing::Env(var), Value::String(s)) = (&self.passing, value)
            && var.len() + 1 + s.len() > MAX_ARG_BYTES
        {
            return Err(format!(
                "must be at most {} bytes (the kernel's limit for one environment string, `{var}=` included), got {}",
                MAX_ARG_BYTES - var.len() - 1,
                s.len()
            ));
        }
        Ok(())
    }
}

/// The bytes `execve` counts against the system's `ARG_MAX` for this argv and environment:
/// each string with its NUL, plus one pointer per string and one per list end.
pub fn exec_size<'a>(
    argv: impl IntoIterator<Item = &'a str>,
    env: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> usize {
    let ptr = std::mem::size_of::<usize>();
    let args: usize = argv.into_iter().map(|a| a.len() + 1 + ptr).sum();
    let vars: usize = env
        .into_iter()
        .map(|(k, v)| k.len() + v.len() + 2 + ptr)
        .sum();
    args + vars + 2 * ptr
}

/// Parameter types with their constraints.
#[derive(Debug, Clone)]
pub enum ParamKind {
    /// A JSON string. Control characters are refused (tab always allowed, newline and
    /// carriage return only when `multiline`), and so is a leading `-` unless
    /// `allow_leading_dash` (a value must never become an option of the program).
    String {
        /// Must match the whole value.
        pattern: Option<Pattern>,
        /// Maximum length in characters.
        max_length: Option<usize>,
        /// Newlines are allowed.
        multiline: bool,
        /// A value may start with `-`.
        allow_leading_dash: bool,
    },
    /// A JSON integer (no fraction, no exponent form).
    Integer {
        /// Inclusive lower bound.
        min: Option<i64>,
        /// Inclusive upper bound.
        max: Option<i64>,
    },
    /// Any JSON number.
    Number {
        /// Inclusive lower bound.
        min: Option<f64>,
        /// Inclusive upper bound.
        max: Option<f64>,
    },
    /// `true` or `false`.
    Boolean,
    /// One of a fixed set of strings (a choice that starts with `-` needs `allow_leading_dash`,
    /// checked when the config is loaded).
    Choice {
        /// The allowed values.
        choices: Vec<String>,
    },
}

/// The longest single argument or environment string the kernel accepts (`MAX_ARG_STRLEN`,
/// 32 pages, including the terminating NUL).
pub const MAX_ARG_BYTES: usize = 32 * 4096 - 1;

/// At most this many characters of a client's text are echoed in an error message.
pub const ECHO_CHARS: usize = 64;

/// A client's text as an error message may show it: control characters escaped, at most
/// [`ECHO_CHARS`] characters (then `…`), so that an answer or a log line stays small and cannot
/// be forged with newlines.
pub fn echo(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == ECHO_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Why a string value has a character it may not have, if it does.
fn bad_character(s: &str, multiline: bool) -> Option<String> {
    let (at, c) = s.chars().enumerate().find(|(_, c)| {
        c.is_control() && !(*c == '\t' || (multiline && matches!(c, '\n' | '\r')))
    })?;
    Some(match c {
        '\0' => format!("must not contain a NUL character (at character {at})"),
        '\n' | '\r' => format!(
            "must be a single line (a line break at character {at}; the parameter does not set multiline)"
        ),
        other => format!(
            "must not contain control characters (U+{:04X} at character {at})",
            other as u32
        ),
    })
}

/// A compiled `pattern` that matches whole values, with its source text.
#[derive(Debug, Clone)]
pub struct Pattern {
    /// As the operator wrote it.
    pub source: String,
    anchored: Regex,
}

impl Pattern {
    /// Compile `source` so that it must match the whole value.
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        Ok(Self {
            source: source.to_owned(),
            anchored: Regex::new(&format!("^(?:{source})$"))?,
        })
    }

    /// True if `value` matches entirely.
    pub fn is_match(&self, value: &str) -> bool {
        self.anchored.is_match(value)
    }
}

/// How a parameter's value reaches the child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Passing {
    /// `--name value` (or the bare flag for a true boolean).
    Option(String),
    /// The value alone, after all options.
    Positional,
    /// An environment variable.
    Env(String),
    /// The child's standard input (the value, then end of file).
    Stdin,
}

impl ParamKind {
    /// The type's wire name.
    pub fn type_name(&self) -> &'static str {
        match self {
            ParamKind::String { .. } => "string",
            ParamKind::Integer { .. } => "integer",
            ParamKind::Number { .. } => "number",
            ParamKind::Boolean => "boolean",
            ParamKind::Choice { .. } => "choice",
        }
    }

    /// Check `value` against the type and constraints; `Err` is a sentence for the client.
    pub fn check(&self, value: &Value) -> Result<(), String> {
        match self {
            ParamKind::String {
                pattern,
                max_length,
                multiline,
                allow_leading_dash,
            } => {
                let Value::String(s) = value else {
                    return Err(format!("must be a string, got {}", json_type(value)));
                };
                if let Some(why) = bad_character(s, *multiline) {
                    return Err(why);
                }
                if s.starts_with('-') && !allow_leading_dash {
                    return Err(
                        "must not start with `-` (it could be taken for an option; the parameter does not set allow_leading_dash)"
                            .to_owned(),
                    );
                }
                if s.len() > MAX_ARG_BYTES {
                    return Err(format!(
                        "must be at most {MAX_ARG_BYTES} bytes (the kernel's limit for one argument), got {}",
                        s.len()
                    ));
                }
                if let Some(max) = max_length {
                    let len = s.chars().count();
                    if len > *max {
                        return Err(format!("must be at most {max} characters, got {len}"));
                    }
                }
                if let Some(p) = pattern
                    && !p.is_match(s)
                {
                    return Err(format!("must match the pattern {}", p.source));
                }
                Ok(())
            }
            ParamKind::Integer { min, max } => {
                let Some(n) = value.as_i64() else {
                    return Err(match value {
                        Value::Number(_) => "must be an integer within 64 bits".to_owned(),
                        other => format!("must be an integer, got {}", json_type(other)),
                    });
                };
                range_check(n, *min, *max)
            }
            ParamKind::Number { min, max } => {
                let Some(n) = value.as_f64().filter(|_| value.is_number()) else {
                    return Err(format!("must be a number, got {}", json_type(value)));
                };
                range_check(n, *min, *max)
            }
            ParamKind::Boolean => match value {
                Value::Bool(_) => Ok(()),
                other => Err(format!("must be a boolean, got {}", json_type(other))),
            },
            ParamKind::Choice { choices } => match value {
                Value::String(s) if choices.iter().any(|c| c == s) => Ok(()),
                Value::String(s) => Err(format!(
                    "must be one of {}, got \"{}\"",
                    choices
                        .iter()
                        .map(|c| format!("\"{c}\""))
                        .collect::<Vec<_>>()
                        .join(", "),
                    echo(s)
                )),
                other => Err(format!("must be a string, got {}", json_type(other))),
            },
        }
    }
}

fn range_check<T: PartialOrd + std::fmt::Display>(
    n: T,
    min: Option<T>,
    max: Option<T>,
) -> Result<(), String> {
    if let Some(min) = min
        && n < min
    {
        return Err(format!("must be at least {min}, got {n}"));
    }
    if let Some(max) = max
        && n > max
    {
        return Err(format!("must be at most {max}, got {n}"));
    }
    Ok(())
}

/// The JSON type of a value, for error messages.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One rejected request field.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// Dotted path of the field (`parameters.count`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// Build one. The field name is passed through [`echo`] (it may come from the client).
    pub fn new(field: impl AsRef<str>, message: impl Into<String>) -> Self {
        Self {
            field: echo(field.as_ref()),
            message: message.into(),
        }
    }
}

/// Parameters that passed validation, with defaults applied. Only [`Module::validate`] makes one.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidParams(Map<String, Value>);

impl ValidParams {
    /// The values by name.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }

    /// Take the values out.
    pub fn into_map(self) -> Map<String, Value> {
        self.0
    }

    /// The values as a run shows them: secret parameters as `***`.
    pub fn shown(&self, module: &Module) -> Map<String, Value> {
        let mut out = self.0.clone();
        for p in module.parameters.iter().filter(|p| p.secret) {
            if let Some(v) = out.get_mut(&p.name) {
                *v = Value::String(crate::output::MASK.to_owned());
            }
        }
        out
    }

    /// The values of the secret parameters only.
    pub fn secret_values(&self, module: &Module) -> Map<String, Value> {
        module
            .parameters
            .iter()
            .filter(|p| p.secret)
            .filter_map(|p| Some((p.name.clone(), self.0.get(&p.name)?.clone())))
            .collect()
    }
}

/// What the child receives: argv, environment variables and stdin.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Invocation {
    /// `command` followed by options then positionals.
    pub argv: Vec<String>,
    /// Module env then env parameters.
    pub env: Vec<(String, String)>,
    /// The value of the stdin parameter, if the module has one and it has a value.
    pub stdin: Option<String>,
}

impl Module {
    /// The parameter passed on stdin, if the module has one.
    pub fn stdin_parameter(&self) -> Option<&Parameter> {
        self.parameters
            .iter()
            .find(|p| matches!(p.passing, Passing::Stdin))
    }

    /// Every secret of a run with these parameters: the module's own and the values of its
    /// secret parameters.
    pub fn secrets_of(&self, params: &ValidParams) -> Vec<String> {
        let mut out = self.secrets.clone();
        for p in self.parameters.iter().filter(|p| p.secret) {
            if let Some(v) = params.0.get(&p.name) {
                out.push(arg_text(v));
            }
        }
        out
    }

    /// Check a request's parameters: unknown names, types, constraints and required ones.
    /// Every bad field is reported, not just the first.
    pub fn validate(&self, given: &Map<String, Value>) -> Result<ValidParams, Vec<FieldError>> {
        let mut errors = Vec::new();
        for name in given.keys() {
            if !self.parameters.iter().any(|p| &p.name == name) {
                errors.push(FieldError::new(
                    format!("parameters.{name}"),
                    format!("unknown parameter for module `{}`", self.id),
                ));
            }
        }
        let mut out = Map::new();
        for p in &self.parameters {
            match given.get(&p.name) {
                Some(v) => match p.kind.check(v).and_then(|()| p.check_passing(v)) {
                    Ok(()) => {
                        out.insert(p.name.clone(), v.clone());
                    }
                    // A secret's value is never echoed.
                    Err(_) if p.secret && matches!(p.kind, ParamKind::Choice { .. }) => errors
                        .push(FieldError::new(
                            format!("parameters.{}", p.name),
                            "must be one of the allowed values",
                        )),
                    Err(msg) => errors.push(FieldError::new(format!("parameters.{}", p.name), msg)),
                },
                None if p.required => errors.push(FieldError::new(
                    format!("parameters.{}", p.name),
                    "is required",
                )),
                None => {
                    if let Some(d) = &p.default {
                        out.insert(p.name.clone(), d.clone());
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(ValidParams(out))
        } else {
            Err(errors)
        }
    }

    /// Build the child's argv and env from valid parameters: `command`, then each option
    /// parameter in declaration order, then `--` if the module sets `end_of_options`, then the
    /// positional ones. Values are passed verbatim (validation made sure that none can be taken
    /// for an option).
    pub fn invocation(&self, params: &ValidParams) -> Invocation {
        let mut argv = self.command.clone();
        let mut positionals = Vec::new();
        let mut stdin = None;
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for p in &self.parameters {
            let Some(value) = params.0.get(&p.name) else {
                continue;
            };
            match (&p.passing, value) {
                (Passing::Option(flag), Value::Bool(b)) => {
                    if *b {
                        argv.push(flag.clone());
                    }
                }
                (Passing::Option(flag), v) => {
                    argv.push(flag.clone());
                    argv.push(arg_text(v));
                }
                (Passing::Positional, v) => positionals.push(arg_text(v)),
                (Passing::Env(var), v) => env.push((var.clone(), arg_text(v))),
                (Passing::Stdin, v) => stdin = Some(arg_text(v)),
            }
        }
        if self.end_of_options {
            argv.push("--".to_owned());
        }
        argv.extend(positionals);
        Invocation { argv, env, stdin }
    }
}

/// A value as the child sees it: strings verbatim, numbers as JSON writes them, booleans as
/// `true`/`false`.
fn arg_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn param(name: &str, kind: ParamKind, passing: Passing) -> Parameter {
        Parameter {
            name: name.into(),
            kind,
            required: false,
            default: None,
            description: None,
            passing,
            secret: false,
        }
    }

    fn module(parameters: Vec<Parameter>) -> Module {
        Module {
            id: "m".into(),
            name: "M".into(),
            description: None,
            command: vec!["prog".into(), "fixed".into()],
            cwd: "/".into(),
            env: BTreeMap::from([("A".into(), "1".into())]),
            secrets: vec![],
            timeout: None,
            max_concurrent: None,
            parameters,
            end_of_options: false,
            limits: Limits::default(),
            run_as: None,
            retry_on_lost: false,
            max_attempts: 1,
            callbacks: Vec::new(),
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn integers_are_strict() {
        let k = ParamKind::Integer {
            min: Some(1),
            max: Some(100),
        };
        assert!(k.check(&json!(3)).is_ok());
        assert!(k.check(&json!("3")).is_err());
        assert!(k.check(&json!(2.5)).is_err());
        assert!(k.check(&json!(3.0)).is_err());
        assert!(k.check(&json!(0)).unwrap_err().contains("at least 1"));
        assert!(k.check(&json!(101)).unwrap_err().contains("at most 100"));
        assert!(k.check(&json!(null)).is_err());
    }

    #[test]
    fn booleans_numbers_choices_and_strings_are_strict() {
        assert!(ParamKind::Boolean.check(&json!("yes")).is_err());
        assert!(ParamKind::Boolean.check(&json!(1)).is_err());
        assert!(ParamKind::Boolean.check(&json!(true)).is_ok());
        let n = ParamKind::Number {
            min: Some(0.5),
            max: None,
        };
        assert!(n.check(&json!(2.5)).is_ok());
        assert!(n.check(&json!(2)).is_ok());
        assert!(n.check(&json!(0.1)).is_err());
        assert!(n.check(&json!("2.5")).is_err());
        let c = ParamKind::Choice {
            choices: vec!["a".into(), "b".into()],
        };
        assert!(c.check(&json!("a")).is_ok());
        assert!(c.check(&json!("c")).is_err());
        assert!(c.check(&json!(1)).is_err());
        let s = ParamKind::String {
            pattern: Some(Pattern::new("[a-z]+").unwrap()),
            max_length: Some(3),
            multiline: false,
            allow_leading_dash: false,
        };
        assert!(s.check(&json!("abc")).is_ok());
        assert!(s.check(&json!("abcd")).unwrap_err().contains("at most 3"));
        // The pattern must match the whole value, not a part of it.
        assert!(s.check(&json!("ab1")).unwrap_err().contains("pattern"));
        assert!(s.check(&json!(5)).is_err());
    }

    #[test]
    fn validate_reports_every_bad_field_and_applies_defaults() {
        let mut count = param(
            "count",
            ParamKind::Integer {
                min: Some(1),
                max: None,
            },
            Passing::Option("--count".into()),
        );
        count.default = Some(json!(3));
        let mut name = param(
            "name",
            ParamKind::String {
                pattern: None,
                max_length: None,
                multiline: false,
                allow_leading_dash: false,
            },
            Passing::Positional,
        );
        name.required = true;
        let m = module(vec![count, name]);

        let errs = m
            .validate(&obj(json!({"count": "x", "bogus": 1})))
            .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["parameters.bogus", "parameters.count", "parameters.name"]
        );

        let ok = m.validate(&obj(json!({"name": "x"}))).unwrap();
        assert_eq!(ok.as_map(), &obj(json!({"count": 3, "name": "x"})));
    }

    #[test]
    fn argv_has_options_in_order_then_positionals_and_env_params() {
        let m = module(vec![
            param("pos1", ParamKind::Boolean, Passing::Positional),
            param(
                "verbose",
                ParamKind::Boolean,
                Passing::Option("--verbose".into()),
            ),
            param(
                "quiet",
                ParamKind::Boolean,
                Passing::Option("--quiet".into()),
            ),
            param(
                "ratio",
                ParamKind::Number {
                    min: None,
                    max: None,
                },
                Passing::Option("-r".into()),
            ),
            param(
                "text",
                ParamKind::String {
                    pattern: None,
                    max_length: None,
                    multiline: false,
                    allow_leading_dash: false,
                },
                Passing::Positional,
            ),
            param("flag", ParamKind::Boolean, Passing::Env("FLAG".into())),
            param(
                "n",
                ParamKind::Integer {
                    min: None,
                    max: None,
                },
                Passing::Env("N".into()),
            ),
        ]);
        let v = m
            .validate(&obj(json!({
                "pos1": true, "verbose": true, "quiet": false, "ratio": 2.5,
                "text": "a b; $(rm -rf /)", "flag": false, "n": 7
            })))
            .unwrap();
        let inv = m.invocation(&v);
        assert_eq!(
            inv.argv,
            [
                "prog",
                "fixed",
                "--verbose",
                "-r",
                "2.5",
                "true",
                "a b; $(rm -rf /)"
            ]
        );
        assert_eq!(
            inv.env,
            [
                ("A".to_owned(), "1".to_owned()),
                ("FLAG".to_owned(), "false".to_owned()),
                ("N".to_owned(), "7".to_owned())
            ]
        );
    }

    fn string_kind(multiline: bool, allow_leading_dash: bool) -> ParamKind {
        ParamKind::String {
            pattern: None,
            max_length: None,
            multiline,
            allow_leading_dash,
        }
    }

    #[test]
    fn values_cannot_become_options() {
        let strict = string_kind(false, false);
        let err = strict.check(&json!("--shout")).unwrap_err();
        assert!(err.contains("must not start with `-`"), "{err}");
        assert!(strict.check(&json!("-")).is_err());
        assert!(strict.check(&json!("a-b")).is_ok());
        assert!(string_kind(false, true).check(&json!("--shout")).is_ok());
        // Numbers keep their sign.
        let n = ParamKind::Integer {
            min: None,
            max: None,
        };
        assert!(n.check(&json!(-5)).is_ok());
    }

    #[test]
    fn control_characters_are_refused() {
        let single = string_kind(false, false);
        let multi = string_kind(true, false);
        let nul = single.check(&json!("a\u{0}b")).unwrap_err();
        assert!(nul.contains("NUL"), "{nul}");
        assert!(single.check(&json!("tab\there")).is_ok());
        assert!(single.check(&json!("two\nlines")).is_err());
        assert!(multi.check(&json!("two\r\nlines")).is_ok());
        assert!(multi.check(&json!("bell\u{7}")).is_err());
        assert!(multi.check(&json!("esc\u{1b}[31m")).is_err());
        assert!(multi.check(&json!("del\u{7f}")).is_err());
        let long = "x".repeat(MAX_ARG_BYTES + 1);
        assert!(single.check(&json!(long)).unwrap_err().contains("kernel"));
    }

    #[test]
    fn echoed_text_is_short_and_escaped() {
        assert_eq!(echo("plain"), "plain");
        assert_eq!(echo("a\nb\u{0}"), "a\\nb\\u{0}");
        let long = echo(&"é".repeat(1000));
        assert_eq!(long.chars().count(), 65);
        assert!(long.ends_with('…'));
        let c = ParamKind::Choice {
            choices: vec!["a".into()],
        };
        let err = c.check(&json!("x\ny".repeat(500))).unwrap_err();
        assert!(err.len() < 200 && !err.contains('\n'), "{err}");
    }

    #[test]
    fn end_of_options_separates_positionals() {
        let mut m = module(vec![
            param("n", string_kind(false, true), Passing::Positional),
            param("v", ParamKind::Boolean, Passing::Option("--verbose".into())),
        ]);
        m.end_of_options = true;
        let v = m.validate(&obj(json!({"n": "-rf", "v": true}))).unwrap();
        assert_eq!(
            m.invocation(&v).argv,
            ["prog", "fixed", "--verbose", "--", "-rf"]
        );
    }

    #[test]
    fn exec_size_counts_strings_and_pointers() {
        let p = std::mem::size_of::<usize>();
        assert_eq!(exec_size(["ab"], [("K", "v")]), 3 + p + 4 + p + 2 * p);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn allowed(s: &str, multiline: bool, dash: bool) -> bool {
            (dash || !s.starts_with('-'))
                && s.len() <= MAX_ARG_BYTES
                && s.chars().all(|c| {
                    !c.is_control() || c == '\t' || (multiline && (c == '\n' || c == '\r'))
                })
        }

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[-a-z \t\n\r\u{0}\u{1b}]{0,12}",
                Just("--shout".to_owned()),
            ]
        }

        proptest! {
            /// A string is accepted exactly when it has no leading dash (unless allowed), no
            /// control character but tab (and line breaks where allowed), and fits one argument.
            #[test]
            fn string_check_is_exact(s in text(), multiline: bool, dash: bool) {
                let ok = string_kind(multiline, dash).check(&json!(s)).is_ok();
                prop_assert_eq!(ok, allowed(&s, multiline, dash));
            }

            /// Whatever the values: validation never panics, and when it passes, argv is the
            /// command, then each option flag followed by its value, then `--`, then the
            /// positionals, each value exactly as given and none of them able to pass for an
            /// option; env values go to the environment only.
            #[test]
            fn valid_values_land_verbatim_in_their_place(
                opt in text(), pos in text(), env in text(), n in any::<i64>(),
            ) {
                let mut m = module(vec![
                    param("opt", string_kind(false, false), Passing::Option("--opt".into())),
                    param("pos", string_kind(false, false), Passing::Positional),
                    param("n", ParamKind::Integer { min: None, max: None }, Passing::Positional),
                    param("env", string_kind(true, false), Passing::Env("E".into())),
                ]);
                m.end_of_options = true;
                let given = obj(json!({"opt": opt, "pos": pos, "env": env, "n": n}));
                match m.validate(&given) {
                    Err(errors) => {
                        prop_assert!(!errors.is_empty());
                        prop_assert!(
                            !allowed(&opt, false, false)
                                || !allowed(&pos, false, false)
                                || !allowed(&env, true, false)
                        );
                    }
                    Ok(valid) => {
                        let inv = m.invocation(&valid);
                        let expect: Vec<String> = vec![
                            "prog".into(), "fixed".into(), "--opt".into(), opt.clone(),
                            "--".into(), pos.clone(), n.to_string(),
                        ];
                        prop_assert_eq!(&inv.argv, &expect);
                        prop_assert!(!opt.starts_with('-') && !pos.starts_with('-'));
                        prop_assert!(inv.env.contains(&("E".to_owned(), env.clone())));
                        prop_assert!(inv.argv.iter().all(|a| !a.contains('\0')));
                    }
                }
            }
        }
    }
}
