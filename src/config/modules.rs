//! `[[modules]]`: one module's command, environment, limits, identity and parameters,
//! validated into a [`Module`].

use std::collections::BTreeMap;
use std::path::Path;

use super::build::{check_env_name, is_module_id, is_param_name};
use super::raw::*;
use super::*;
use crate::module::{Limits, MAX_ARG_BYTES, Module, ParamKind, Parameter, Passing, Pattern, RunAs};
pub(super) fn build_module(m: RawModule, base: &Path, key: &str) -> Result<Module, KeyError> {
    if !is_module_id(&m.id) {
        return Err((
            format!("{key}.id"),
            format!(
                "`{}` is not a valid module id ([a-z0-9][a-z0-9_-]{{0,63}})",
                m.id
            ),
        ));
    }
    let mut secrets = Vec::new();
    let mut command = Vec::with_capacity(m.command.len());
    for (i, raw) in m.command.into_iter().enumerate() {
        let (arg, secret) = resolve(raw, base, &format!("{key}.command[{i}]"))?;
        if secret {
            if i == 0 {
                return Err((
                    format!("{key}.command[0]"),
                    "the program cannot be a secret".into(),
                ));
            }
            secrets.push(arg.clone());
        }
        command.push(arg);
    }
    let mut env = BTreeMap::new();
    for (name, raw) in m.env {
        let (value, secret) = resolve(raw, base, &format!("{key}.env.{name}"))?;
        if secret {
            secrets.push(value.clone());
        }
        env.insert(name, value);
    }
    if command.is_empty() || command[0].is_empty() {
        return Err((
            format!("{key}.command"),
            "must name a program: command = [\"program\", \"arg\", ...]".into(),
        ));
    }
    let cwd = match &m.cwd {
        Some(c) => base.join(c),
        None => base.to_owned(),
    };
    if !cwd.is_dir() {
        return Err((
            format!("{key}.cwd"),
            format!("`{}` is not a directory", cwd.display()),
        ));
    }
    for (i, arg) in command.iter().enumerate() {
        if arg.len() > MAX_ARG_BYTES || arg.contains('\0') {
            return Err((
                format!("{key}.command[{i}]"),
                format!("must be at most {MAX_ARG_BYTES} bytes, without NUL characters"),
            ));
        }
    }
    for (name, value) in &env {
        check_env_name(name).map_err(|msg| (format!("{key}.env.{name}"), msg))?;
        if name.len() + 1 + value.len() > MAX_ARG_BYTES || value.contains('\0') {
            return Err((
                format!("{key}.env.{name}"),
                format!(
                    "`{name}=value` must be at most {MAX_ARG_BYTES} bytes (the kernel's limit for one environment string), without NUL characters"
                ),
            ));
        }
    }
    let limits = build_limits(&m.limits, key)?;
    for (i, url) in m.callbacks.iter().enumerate() {
        crate::callbacks::check_url(url).map_err(|e| (format!("{key}.callbacks[{i}]"), e))?;
    }
    let callbacks = m.callbacks.clone();
    let max_attempts = match (m.retry_on_lost, m.max_attempts) {
        (_, Some(0)) => {
            return Err((format!("{key}.max_attempts"), "must be at least 1".into()));
        }
        (false, Some(n)) if n > 1 => {
            return Err((
                format!("{key}.max_attempts"),
                "more than one attempt needs retry_on_lost = true".into(),
            ));
        }
        (true, None) => 3,
        (_, Some(n)) => n,
        (false, None) => 1,
    };
    let run_as = build_run_as(m.user.as_deref(), m.group.as_deref(), key)?;
    if m.timeout.is_some_and(|t| t.is_zero()) {
        return Err((format!("{key}.timeout"), "must be longer than 0s".into()));
    }
    let mut parameters: Vec<Parameter> = Vec::with_capacity(m.parameters.len());
    for (j, p) in m.parameters.into_iter().enumerate() {
        let pkey = format!("{key}.parameters[{j}]");
        let param = build_parameter(p, &pkey)?;
        if parameters.iter().any(|q| q.name == param.name) {
            return Err((
                format!("{pkey}.name"),
                format!("duplicate parameter `{}`", param.name),
            ));
        }
        parameters.push(param);
    }
    if let [_, second, ..] = parameters
        .iter()
        .filter(|p| matches!(p.passing, Passing::Stdin))
        .collect::<Vec<_>>()[..]
    {
        return Err((
            format!("{key}.parameters"),
            format!(
                "only one parameter can be passed on stdin (`{}` is a second one)",
                second.name
            ),
        ));
    }
    Ok(Module {
        name: m.name.unwrap_or_else(|| m.id.clone()),
        id: m.id,
        description: m.description,
        command,
        cwd,
        env,
        secrets,
        timeout: m.timeout,
        max_concurrent: m.max_concurrent,
        parameters,
        end_of_options: m.end_of_options,
        limits,
        run_as,
        retry_on_lost: m.retry_on_lost,
        max_attempts,
        callbacks,
    })
}

pub(super) fn build_limits(l: &RawLimits, key: &str) -> Result<Limits, KeyError> {
    let positive = |field: &str, v: Option<u64>| -> Result<Option<u64>, KeyError> {
        match v {
            Some(0) => Err((
                format!("{key}.limits.{field}"),
                "must be more than 0".into(),
            )),
            other => Ok(other),
        }
    };
    if l.cpu.is_some_and(|c| c.as_secs() == 0) {
        return Err((
            format!("{key}.limits.cpu"),
            "must be at least 1s (the kernel counts CPU time in seconds)".into(),
        ));
    }
    Ok(Limits {
        memory: positive("memory", l.memory)?,
        cpu: l.cpu,
        open_files: positive("open_files", l.open_files)?,
        processes: positive("processes", l.processes)?,
        file_size: positive("file_size", l.file_size)?,
    })
}

/// `user` / `group` of a module: looked up once, here; only root can switch to them.
pub(super) fn build_run_as(
    user: Option<&str>,
    group: Option<&str>,
    key: &str,
) -> Result<Option<RunAs>, KeyError> {
    use nix::unistd::{Group, User};
    let Some(name) = user else {
        if group.is_some() {
            return Err((format!("{key}.group"), "is only allowed with user".into()));
        }
        return Ok(None);
    };
    if !nix::unistd::geteuid().is_root() {
        return Err((
            format!("{key}.user"),
            "modrun can switch users only when it runs as root".into(),
        ));
    }
    let u = User::from_name(name).ok().flatten().ok_or_else(|| {
        (
            format!("{key}.user"),
            format!("no user `{name}` on this system"),
        )
    })?;
    let gid = match group {
        None => u.gid.as_raw(),
        Some(g) => Group::from_name(g)
            .ok()
            .flatten()
            .ok_or_else(|| {
                (
                    format!("{key}.group"),
                    format!("no group `{g}` on this system"),
                )
            })?
            .gid
            .as_raw(),
    };
    if u.uid.is_root() {
        return Err((
            format!("{key}.user"),
            "names root: leave user out to run as modrun's own user".into(),
        ));
    }
    Ok(Some(RunAs {
        user: name.to_owned(),
        uid: u.uid.as_raw(),
        gid,
    }))
}

pub(super) fn build_parameter(p: RawParameter, key: &str) -> Result<Parameter, KeyError> {
    let k = |field: &str| format!("{key}.{field}");
    if !is_param_name(&p.name) {
        return Err((
            k("name"),
            format!(
                "`{}` is not a valid parameter name ([a-z0-9_]{{1,64}})",
                p.name
            ),
        ));
    }
    let only_for = |field: &str, present: bool, types: &str| -> Result<(), KeyError> {
        if present {
            Err((k(field), format!("is only allowed for type {types}")))
        } else {
            Ok(())
        }
    };
    let numeric = matches!(p.kind, RawType::Integer | RawType::Number);
    only_for("min", p.min.is_some() && !numeric, "integer or number")?;
    only_for("max", p.max.is_some() && !numeric, "integer or number")?;
    only_for(
        "choices",
        p.choices.is_some() && p.kind != RawType::Choice,
        "choice",
    )?;
    only_for(
        "pattern",
        p.pattern.is_some() && p.kind != RawType::String,
        "string",
    )?;
    only_for(
        "max_length",
        p.max_length.is_some() && p.kind != RawType::String,
        "string",
    )?;
    only_for(
        "multiline",
        p.multiline && p.kind != RawType::String,
        "string",
    )?;
    only_for(
        "allow_leading_dash",
        p.allow_leading_dash && !matches!(p.kind, RawType::String | RawType::Choice),
        "string or choice",
    )?;

    let kind = match p.kind {
        RawType::String => ParamKind::String {
            pattern: p
                .pattern
                .as_deref()
                .map(Pattern::new)
                .transpose()
                .map_err(|e| (k("pattern"), format!("invalid regular expression: {e}")))?,
            max_length: p.max_length,
            multiline: p.multiline,
            allow_leading_dash: p.allow_leading_dash,
        },
        RawType::Integer => {
            let int = |v: &Option<Value>, field: &str| -> Result<Option<i64>, KeyError> {
                v.as_ref()
                    .map(|v| {
                        v.as_i64()
                            .ok_or((k(field), "must be an integer".to_owned()))
                    })
                    .transpose()
            };
            ParamKind::Integer {
                min: int(&p.min, "min")?,
                max: int(&p.max, "max")?,
            }
        }
        RawType::Number => {
            let num = |v: &Option<Value>, field: &str| -> Result<Option<f64>, KeyError> {
                v.as_ref()
                    .map(|v| v.as_f64().ok_or((k(field), "must be a number".to_owned())))
                    .transpose()
            };
            ParamKind::Number {
                min: num(&p.min, "min")?,
                max: num(&p.max, "max")?,
            }
        }
        RawType::Boolean => ParamKind::Boolean,
        RawType::Choice => {
            let choices = p
                .choices
                .ok_or((k("choices"), "is required for type choice".to_owned()))?;
            if choices.is_empty() {
                return Err((k("choices"), "must list at least one value".into()));
            }
            for (i, c) in choices.iter().enumerate() {
                if c.starts_with('-') && !p.allow_leading_dash {
                    return Err((
                        format!("{key}.choices[{i}]"),
                        format!(
                            "`{c}` starts with `-` and could be taken for an option; set allow_leading_dash = true if the program expects it"
                        ),
                    ));
                }
                if c.chars().any(char::is_control) {
                    return Err((
                        format!("{key}.choices[{i}]"),
                        "must not contain control characters".into(),
                    ));
                }
            }
            ParamKind::Choice { choices }
        }
    };
    if let ParamKind::Integer {
        min: Some(a),
        max: Some(b),
    } = &kind
        && a > b
    {
        return Err((k("min"), format!("min {a} is greater than max {b}")));
    }
    if let ParamKind::Number {
        min: Some(a),
        max: Some(b),
    } = &kind
        && a > b
    {
        return Err((k("min"), format!("min {a} is greater than max {b}")));
    }
    if let Some(d) = &p.default {
        kind.check(d)
            .map_err(|m| (k("default"), format!("the default {m}")))?;
    }
    let ways = [p.env.is_some(), p.positional, p.arg.is_some(), p.stdin]
        .iter()
        .filter(|w| **w)
        .count();
    if ways > 1 {
        return Err((
            k("env"),
            "a parameter is passed either as env, as positional, as an option or on stdin, not several"
                .into(),
        ));
    }
    let passing = if let Some(var) = p.env {
        check_env_name(&var).map_err(|m| (k("env"), m))?;
        Passing::Env(var)
    } else if p.stdin {
        Passing::Stdin
    } else if p.positional {
        if matches!(kind, ParamKind::Boolean) {
            return Err((k("positional"), "a boolean cannot be positional".into()));
        }
        Passing::Positional
    } else {
        let flag = p.arg.unwrap_or_else(|| format!("--{}", p.name));
        if flag.is_empty() {
            return Err((k("arg"), "must not be empty".into()));
        }
        Passing::Option(flag)
    };
    if p.secret && !matches!(passing, Passing::Env(_) | Passing::Stdin) {
        return Err((
            k("secret"),
            "a secret parameter must be passed by env or stdin: argv is readable by every local user in /proc"
                .into(),
        ));
    }
    Ok(Parameter {
        name: p.name,
        kind,
        required: p.required,
        default: p.default,
        description: p.description,
        passing,
        secret: p.secret,
    })
}
