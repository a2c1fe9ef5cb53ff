//! Unit tests of `config`.

use super::*;

#[test]
fn flags_win_over_file_which_wins_over_defaults() {
    let file: ConfigLayer =
        toml::from_str("http = \"127.0.0.1:9000\"\ntcp = \"127.0.0.1:9001\"\nmax_body = \"2MiB\"")
            .expect("valid toml");
    let flags = ConfigLayer {
        http: Some("127.0.0.1:1234".parse().expect("addr")),
        ..ConfigLayer::default()
    };
    let config = flags.over(file).over_defaults().expect("valid");
    assert_eq!(config.http.port(), 1234);
    assert_eq!(config.tcp.port(), 9001);
    assert_eq!(config.max_body, 2 << 20);
    assert_eq!(config.data_dir, PathBuf::from("./duplex-data"));
    assert_eq!(config.store_url(), "sqlite://./duplex-data/duplex.db");
}

#[test]
fn secrets_that_would_let_anyone_in_are_refused() {
    let empty_key = ConfigLayer {
        api_key: Some(String::new()),
        ..ConfigLayer::default()
    };
    assert!(matches!(
        empty_key.over_defaults(),
        Err(ConfigError::Invalid { key: "api_key", .. })
    ));
    let short_secret = ConfigLayer {
        jwt_secret: Some("short".into()),
        ..ConfigLayer::default()
    };
    assert!(matches!(
        short_secret.over_defaults(),
        Err(ConfigError::Invalid {
            key: "jwt_secret",
            ..
        })
    ));
    let bad_duration: ConfigLayer = toml::from_str("idle_timeout = \"soon\"").expect("toml");
    assert!(matches!(
        bad_duration.over_defaults(),
        Err(ConfigError::Invalid {
            key: "idle_timeout",
            ..
        })
    ));
    let namespaces: ConfigLayer =
        toml::from_str("[namespaces.chat]\nhistory_size = 7").expect("toml");
    let config = namespaces.over_defaults().expect("valid");
    assert_eq!(config.namespaces.for_channel("chat:x").history_size, 7);
}

#[test]
fn the_file_lists_scoped_keys_collection_rules_and_timeouts() {
    let file: ConfigLayer = toml::from_str(
        "body_read_timeout = \"5s\"\nwrite_timeout = \"45s\"\n\
         [[api_keys]]\nname = \"notifier\"\nkey = \"a-long-random-key-0123\"\n\
         scopes = [\"channels:publish\"]\n\
         [collections.payroll]\nread = \"token_channels\"\nwrite = \"server\"\n",
    )
    .expect("valid toml");
    let config = file.over_defaults().expect("valid");
    assert_eq!(config.body_read_timeout, Duration::from_secs(5));
    assert_eq!(config.write_timeout, Duration::from_secs(45));
    for text in ["write_timeout = \"0s\"", "write_timeout = \"never\""] {
        let layer: ConfigLayer = toml::from_str(text).expect("toml");
        assert!(
            matches!(
                layer.over_defaults(),
                Err(ConfigError::Invalid {
                    key: "write_timeout",
                    ..
                })
            ),
            "{text}"
        );
    }
    assert_eq!(config.api_keys.len(), 1);
    assert_eq!(
        config.api_keys[0].scopes,
        [crate::api_keys::Scope::ChannelsPublish]
    );
    let payroll = config.namespaces.collection("payroll");
    assert_eq!(payroll.write, crate::hub::namespace::Access::Server);
    assert_eq!(
        config.namespaces.for_channel("records:payroll").subscribe,
        crate::hub::namespace::Access::TokenChannels
    );
    let weak: ConfigLayer =
        toml::from_str("[[api_keys]]\nkey = \"short\"\nscopes = [\"*\"]").expect("toml");
    assert!(matches!(
        weak.over_defaults(),
        Err(ConfigError::Invalid {
            key: "api_keys",
            ..
        })
    ));
    assert!(
        toml::from_str::<ConfigLayer>("[[api_keys]]\nkey = \"k\"\nscopes = [\"all\"]").is_err()
    );
}

#[test]
fn the_file_names_the_broker_the_node_and_the_presence_expiry() {
    let file: ConfigLayer = toml::from_str(
        "broker = \"redis://10.0.0.9:6379\"\nnode_id = \"a\"\npresence_ttl = \"10s\"\n",
    )
    .expect("valid toml");
    let config = file.over_defaults().expect("valid");
    assert_eq!(config.broker.as_deref(), Some("redis://10.0.0.9:6379"));
    assert_eq!(config.node_id.as_deref(), Some("a"));
    assert_eq!(config.presence_ttl, Duration::from_secs(10));
    let defaults = ConfigLayer::default().over_defaults().expect("valid");
    assert_eq!((defaults.broker, defaults.node_id), (None, None));
    assert_eq!(defaults.presence_ttl, Duration::from_secs(30));
    for (text, key) in [
        ("presence_ttl = \"500ms\"", "presence_ttl"),
        ("presence_ttl = \"soon\"", "presence_ttl"),
    ] {
        let layer: ConfigLayer = toml::from_str(text).expect("toml");
        assert!(
            matches!(layer.over_defaults(), Err(ConfigError::Invalid { key: k, .. }) if k == key),
            "{text}"
        );
    }
}

#[test]
fn the_file_bounds_queues_history_and_channels_in_bytes() {
    let file: ConfigLayer = toml::from_str(
        "queue_bytes = \"256KiB\"\nmax_queued_bytes = \"64MiB\"\nmax_history_bytes = \"32MiB\"\n\
         max_channels = 500\n[namespaces.chat]\nhistory_bytes = \"128KiB\"\n",
    )
    .expect("valid toml");
    let config = ConfigLayer::default()
        .over(file)
        .over_defaults()
        .expect("valid");
    assert_eq!(config.sockets.queue_bytes, 256 * 1024);
    assert_eq!(config.sockets.announced().queue_bytes, 256 * 1024);
    assert_eq!(config.hub.max_queued_bytes, 64 * 1024 * 1024);
    assert_eq!(config.hub.max_history_bytes, 32 * 1024 * 1024);
    assert_eq!(config.hub.max_channels, 500);
    assert_eq!(
        config.namespaces.for_channel("chat:x").history_bytes,
        128 * 1024
    );
    let defaults = Config::default();
    assert_eq!(defaults.sockets.queue_bytes, 1024 * 1024);
    assert_eq!(defaults.hub.max_channels, 100_000);
    assert!(config.console && config.examples, "both on by default");
    let off: ConfigLayer = toml::from_str("console = false\nexamples = false").expect("valid toml");
    let off = ConfigLayer::default()
        .over(off)
        .over_defaults()
        .expect("valid");
    assert!(!off.console && !off.examples);
    let zero: ConfigLayer = toml::from_str("max_channels = 0").expect("valid toml");
    assert!(ConfigLayer::default().over(zero).over_defaults().is_err());
}

#[test]
fn unknown_keys_in_the_file_are_errors() {
    assert!(toml::from_str::<ConfigLayer>("htpp = \"127.0.0.1:1\"").is_err());
}

#[test]
fn hooks_and_webhooks_come_from_their_tables_and_are_checked() {
    let file: ConfigLayer = toml::from_str(
        "[hooks]\nurl = \"http://127.0.0.1:9000/hooks\"\nevents = [\"connect\", \"publish\"]\n\
         [webhooks]\nurl = \"http://127.0.0.1:9000/events\"\nevents = [\"disconnected\"]\n\
         [namespaces.stream]\nhooks = [\"subscribe\"]",
    )
    .expect("toml");
    let config = file.over_defaults().expect("valid");
    let hooks = config.hooks.expect("hooks");
    assert!(hooks.events.has(crate::hooks::Hook::Publish));
    assert_eq!(hooks.timeout, std::time::Duration::from_secs(2));
    let webhooks = config.webhooks.expect("webhooks");
    assert!(webhooks.wants(crate::webhooks::EventKind::Disconnected));
    assert!(!webhooks.wants(crate::webhooks::EventKind::Connected));
    let stream = config.namespaces.for_channel("stream:x");
    assert!(stream.hooks.has(crate::hooks::Hook::Subscribe));
    assert!(!stream.hooks.has(crate::hooks::Hook::Publish));
    assert!(
        config
            .namespaces
            .for_channel("chat:x")
            .hooks
            .has(crate::hooks::Hook::Publish)
    );

    let bad: ConfigLayer =
        toml::from_str("[webhooks]\nurl = \"http://x\"\nevents = []").expect("toml");
    assert!(matches!(
        bad.over_defaults(),
        Err(ConfigError::Invalid {
            key: "webhooks",
            ..
        })
    ));
    let bad: ConfigLayer =
        toml::from_str("[hooks]\nurl = \"ftp://x\"\nevents = [\"rpc\"]").expect("toml");
    assert!(matches!(
        bad.over_defaults(),
        Err(ConfigError::Invalid { key: "hooks", .. })
    ));
}
