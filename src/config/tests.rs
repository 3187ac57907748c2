//! The config loader's tests.

use super::*;

fn load(text: &str) -> Result<Config, ConfigError> {
    let dir = std::env::temp_dir();
    Config::from_toml(text, &dir.join("modrun.toml"))
}

#[test]
fn an_empty_file_gives_the_defaults() {
    let c = load("").unwrap();
    assert_eq!(c.runner.max_concurrent.get(), 4);
    assert_eq!(c.runner.max_queued, 1000);
    assert_eq!(c.runner.kill_grace, Duration::from_secs(5));
    assert_eq!(c.output.max_run_bytes, 64 << 20);
    assert_eq!(c.server.bind.to_string(), "127.0.0.1:8080");
    assert_eq!(c.retention.keep_runs, 10_000);
    assert_eq!(c.retention.keep_for, Duration::from_secs(7 * 86400));
    assert_eq!(c.storage.path, Some(std::env::temp_dir().join("data")));
    let mem = load("[storage]\npath = \"\"\n").unwrap();
    assert_eq!(mem.storage.path, None);
}

#[test]
fn durations_and_sizes_parse_with_units() {
    let c = load(
        "[runner]\ndefault_timeout = \"1h30m\"\nkill_grace = \"500ms\"\n\
         [output]\nmax_line_bytes = \"64KiB\"\nmax_run_bytes = 1000\n",
    )
    .unwrap();
    assert_eq!(c.runner.default_timeout, Duration::from_secs(5400));
    assert_eq!(c.runner.kill_grace, Duration::from_millis(500));
    assert_eq!(c.output.max_line_bytes.get(), 65536);
    assert_eq!(c.output.max_run_bytes, 1000);
    assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
    assert!(parse_size("12 parsecs").is_err());
    assert_eq!(
        parse_duration("7d").unwrap(),
        Duration::from_secs(7 * 86400)
    );
}

#[test]
fn errors_name_the_dotted_key() {
    let e = load("[runner]\nmax_concurrent = 0\n").unwrap_err();
    assert_eq!(e.key.as_deref(), Some("runner.max_concurrent"), "{e}");
    assert!(e.to_string().contains("modrun.toml"), "{e}");

    let e = load(
        "[[modules]]\nid = \"a\"\ncommand = [\"true\"]\n\
         [[modules]]\nid = \"b\"\ncommand = [\"true\"]\n\
         [[modules]]\nid = \"c\"\ncommand = [\"true\"]\n\
         [[modules.parameters]]\nname = \"x\"\ntype = \"float\"\n",
    )
    .unwrap_err();
    assert_eq!(
        e.key.as_deref(),
        Some("modules[2].parameters[0].type"),
        "{e}"
    );

    let e = load("[runner]\nkill_grace = \"soon\"\n").unwrap_err();
    assert_eq!(e.key.as_deref(), Some("runner.kill_grace"), "{e}");
    assert!(e.message.contains("invalid duration"), "{e}");

    let e = load("[runner]\nbogus = 1\n").unwrap_err();
    assert!(e.message.contains("unknown field"), "{e}");
}

#[test]
fn module_rules_are_checked() {
    let bad = [
        ("id = \"Bad\"\ncommand = [\"true\"]", "modules[0].id"),
        ("id = \"a\"\ncommand = []", "modules[0].command"),
        (
            "id = \"a\"\ncommand = [\"true\"]\ncwd = \"/nonexistent-dir\"",
            "modules[0].cwd",
        ),
        (
            "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"integer\"\ndefault = \"3\"",
            "modules[0].parameters[0].default",
        ),
        (
            "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"boolean\"\npositional = true",
            "modules[0].parameters[0].positional",
        ),
        (
            "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"choice\"",
            "modules[0].parameters[0].choices",
        ),
        (
            "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"string\"\npattern = \"(\"",
            "modules[0].parameters[0].pattern",
        ),
        (
            "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"string\"\nmin = 1",
            "modules[0].parameters[0].min",
        ),
        (
            "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"choice\"\nchoices = [\"ok\", \"--force\"]",
            "modules[0].parameters[0].choices[1]",
        ),
        (
            "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"string\"\ndefault = \"-x\"",
            "modules[0].parameters[0].default",
        ),
        (
            "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"integer\"\nmultiline = true",
            "modules[0].parameters[0].multiline",
        ),
        (
            "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"string\"\nsecret = true\npositional = true",
            "modules[0].parameters[0].secret",
        ),
        (
            "id = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"n\"\ntype = \"string\"\nstdin = true\n[[modules.parameters]]\nname = \"m\"\ntype = \"string\"\nstdin = true",
            "modules[0].parameters",
        ),
        (
            "id = \"a\"\ncommand = [\"true\", { from_env = \"MODRUN_NO_SUCH_VARIABLE_X\" }]",
            "modules[0].command[1]",
        ),
        (
            "id = \"a\"\ncommand = [\"true\"]\nenv = { K = { from_file = \"/nonexistent/secret\" } }",
            "modules[0].env.K",
        ),
        (
            "id = \"a\"\ncommand = [\"true\"]\nenv = { K = { value = \"x\", from_env = \"HOME\" } }",
            "modules[0].env.K",
        ),
    ];
    for (module, key) in bad {
        let e = load(&format!("[[modules]]\n{module}\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some(key), "{module}: {e}");
    }
    let e = load(
        "[[modules]]\nid = \"a\"\ncommand = [\"true\"]\n[[modules]]\nid = \"a\"\ncommand = [\"true\"]\n",
    )
    .unwrap_err();
    assert_eq!(e.key.as_deref(), Some("modules[1].id"));
}

#[test]
fn the_bundled_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/modrun.toml");
    let c = Config::load(&path).unwrap();
    assert!(c.modules.len() >= 3);
}

fn load_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = std::env::temp_dir();
    let vars: Vec<(std::ffi::OsString, std::ffi::OsString)> =
        vars.iter().map(|(k, v)| (k.into(), v.into())).collect();
    Config::from_toml_env(text, &dir.join("modrun.toml"), vars)
}

/// Every section's keys can be set from the environment, over the file, and are validated as
/// if written there; an error names the variable.
#[test]
fn environment_overrides_are_validated_like_the_file() {
    let c = load_env(
        "[runner]\nmax_concurrent = 2\n[storage]\npath = \"data\"\n",
        &[
            ("MODRUN_RUNNER__MAX_CONCURRENT", "8"),
            ("MODRUN_RUNNER__DEFAULT_TIMEOUT", "90s"),
            ("MODRUN_SERVER__BIND", "0.0.0.0:9000"),
            ("MODRUN_STORAGE__PATH", "/data"),
            ("MODRUN_RUNNER__ENV_ALLOW", "[\"PATH\", \"LANG\"]"),
            ("MODRUN_AUTH__ALLOW_ANONYMOUS", "true"),
            ("MODRUN_LOG__FORMAT", "json"),
        ],
    )
    .unwrap();
    assert_eq!(c.runner.max_concurrent.get(), 8);
    assert_eq!(c.runner.default_timeout, Duration::from_secs(90));
    assert_eq!(c.server.bind.to_string(), "0.0.0.0:9000");
    assert_eq!(c.storage.path, Some(std::path::PathBuf::from("/data")));
    assert_eq!(c.runner.env_allow, ["PATH", "LANG"]);
    assert!(c.auth.allow_anonymous);
    assert_eq!(c.log.format, LogFormat::Json);

    let e = load_env("", &[("MODRUN_RUNNER__MAX_CONCURRENT", "0")]).unwrap_err();
    assert_eq!(
        e.key.as_deref(),
        Some("runner.max_concurrent (set by MODRUN_RUNNER__MAX_CONCURRENT)")
    );
    let e = load_env("", &[("MODRUN_SSE__KEEP_ALIVE", "0s")]).unwrap_err();
    assert_eq!(
        e.key.as_deref(),
        Some("sse.keep_alive (set by MODRUN_SSE__KEEP_ALIVE)")
    );
    let e = load_env("", &[("MODRUN_RUNNER__NO_SUCH", "1")]).unwrap_err();
    assert!(e.to_string().contains("MODRUN_RUNNER__NO_SUCH"), "{e}");
    // Tokens as a TOML array of inline tables.
    let sha = "a".repeat(64);
    let c = load_env(
        "",
        &[(
            "MODRUN_AUTH__TOKENS",
            &format!(r#"[{{name = "me", sha256 = "{sha}", scopes = ["metrics:read"]}}]"#),
        )],
    )
    .unwrap();
    assert_eq!(c.auth.tokens.len(), 1);
    assert_eq!(c.auth.tokens[0].name, "me");
    // A storage URL from the environment replaces the file's path.
    let c = load_env(
        "[storage]\npath = \"data\"\n",
        &[("MODRUN_STORAGE__URL", "postgres://u@db/modrun")],
    )
    .unwrap();
    assert!(c.storage.url.is_some());
}
