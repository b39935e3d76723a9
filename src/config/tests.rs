use super::*;
use figment::Jail;

#[test]
fn sizes_parse_in_every_unit() {
    assert_eq!("20GiB".parse::<ByteSize>().unwrap().0, 20 << 30);
    assert_eq!("512MB".parse::<ByteSize>().unwrap().0, 512_000_000);
    assert_eq!("1.5 KiB".parse::<ByteSize>().unwrap().0, 1536);
    assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
    assert!("20 parsecs".parse::<ByteSize>().is_err());
    assert!("".parse::<ByteSize>().is_err());
    assert!("99999999999TiB".parse::<ByteSize>().is_err());
    assert_eq!(ByteSize(20 << 30).to_string(), "20GiB");
}

#[test]
fn no_file_is_a_docker_hub_mirror() {
    Jail::expect_with(|_| {
        let c = Config::load(None).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].name, "docker.io");
        assert!(c.upstreams[0].default);
        assert!(c.cache.dir.ends_with("ocicache"));
        Ok(())
    });
}

#[test]
fn file_then_env_override() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "o.toml",
            r#"
                listen = "127.0.0.1:6000"
                [cache]
                dir = "/tmp/x"
                max_size = "1GiB"
                [[upstreams]]
                name = "ghcr.io"
                url = "https://ghcr.io"
                tag_ttl = "0s"
                "#,
        )?;
        jail.set_env("OCICACHE_CACHE__DIR", "/tmp/y");
        jail.set_env("OCICACHE_OFFLINE", "true");
        jail.set_env("OCICACHE_CACHE__MAX_FILLS", "8");
        let c = Config::load(Some(Path::new("o.toml"))).unwrap();
        assert_eq!(c.cache.max_fills, 8);
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.cache.dir, PathBuf::from("/tmp/y"));
        assert_eq!(c.cache.max_size.0, 1 << 30);
        assert!(c.offline);
        assert_eq!(c.upstreams[0].tag_ttl.0, Duration::ZERO);
        assert!(!c.upstreams[0].default);
        Ok(())
    });
}

#[test]
fn unknown_keys_and_bad_values_name_the_key() {
    Jail::expect_with(|jail| {
        jail.create_file("a.toml", "[cache]\nmax_sise = \"1GiB\"\n")?;
        let e = Config::load(Some(Path::new("a.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_sise"), "{e}");

        jail.create_file("b.toml", "[cache]\nmax_size = \"lots\"\n")?;
        let e = Config::load(Some(Path::new("b.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_size") && e.contains("lots"), "{e}");

        jail.create_file("c.toml", "[[upstreams]]\nname = \"x\"\nurl = \"ftp://x\"\n")?;
        let e = Config::load(Some(Path::new("c.toml")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("upstreams[0].url") && e.contains("ftp://x"),
            "{e}"
        );

        jail.create_file(
            "d.toml",
            "[[upstreams]]\nname = \"x\"\nurl = \"http://x\"\ntag_ttl = \"soon\"\n",
        )?;
        let e = Config::load(Some(Path::new("d.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tag_ttl") && e.contains("soon"), "{e}");

        jail.create_file("e.toml", "[cache]\nmax_fills = 0\n")?;
        let e = Config::load(Some(Path::new("e.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cache.max_fills"), "{e}");
        Ok(())
    });
}

#[test]
fn the_shared_tier_from_a_file_and_the_environment() {
    Jail::expect_with(|jail| {
        jail.create_file("k", "GKabc\n")?;
        jail.create_file(
            "s.toml",
            r#"
                [cache.s3]
                endpoint = "http://127.0.0.1:3900"
                bucket = "ocicache"
                access_key_id_file = "k"
                secret_access_key = "verysecret"
                "#,
        )?;
        jail.set_env("OCICACHE_CACHE__S3__REGION", "garage");
        jail.set_env("OCICACHE_CACHE__S3__MAX_SIZE", "5GiB");
        let c = Config::load(Some(Path::new("s.toml"))).unwrap();
        let s3 = c.cache.s3.as_ref().unwrap();
        assert_eq!((s3.region.as_str(), s3.max_size.0), ("garage", 5 << 30));
        assert!(s3.path_style && !s3.redirect);
        assert_eq!(s3.lease_wait.0, Duration::from_secs(300));
        let (id, secret) = s3.credentials().unwrap();
        assert_eq!(id.as_deref(), Some("GKabc"));
        assert_eq!(secret.unwrap().0, "verysecret");
        assert!(!format!("{c:?}").contains("verysecret"));
        jail.clear_env();

        for (body, key) in [
            ("bucket = \"a/b\"", "cache.s3.bucket"),
            (
                "bucket = \"b\"\nendpoint = \"ftp://x\"",
                "cache.s3.endpoint",
            ),
            ("bucket = \"b\"\nprefix = \"a/../b\"", "cache.s3.prefix"),
            (
                "bucket = \"b\"\nsecret_access_key_file = \"nope\"",
                "cache.s3.secret_access_key_file",
            ),
            ("bucket = \"b\"\nmax_size = \"1KiB\"", "cache.s3.max_size"),
            ("bucket = \"b\"\nbukket = \"c\"", "bukket"),
        ] {
            jail.create_file("bad.toml", &format!("[cache.s3]\n{body}\n"))?;
            let e = Config::load(Some(Path::new("bad.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{body}: {e}");
        }
        Ok(())
    });
}

#[test]
fn peers_from_a_file_and_the_environment_validated() {
    Jail::expect_with(|jail| {
        jail.create_file("secret", "0123456789abcdef-from-a-file\n")?;
        jail.create_file(
            "p.toml",
            "[cache.s3]\nbucket = \"b\"\n[cache.s3.peers]\nlisten = \"0.0.0.0:5001\"\n",
        )?;
        jail.set_env(
            "OCICACHE_CACHE__S3__PEERS__ADVERTISE",
            "http://10.1.2.3:5001",
        );
        jail.set_env("OCICACHE_CACHE__S3__PEERS__SECRET_FILE", "secret");
        let c = Config::load(Some(Path::new("p.toml"))).unwrap();
        let peers = c.cache.s3.as_ref().unwrap().peers.as_ref().unwrap();
        assert_eq!(peers.listen.port(), 5001);
        assert_eq!(peers.advertise, "http://10.1.2.3:5001");
        assert_eq!(peers.secret().unwrap().0, "0123456789abcdef-from-a-file");
        jail.clear_env();

        let base = "[cache.s3]\nbucket = \"b\"\n[cache.s3.peers]\n";
        let good = "listen = \"0.0.0.0:5001\"\nadvertise = \"http://10.0.0.1:5001\"\n";
        for (body, key, why) in [
                (
                    "listen = \"0.0.0.0:5001\"\nadvertise = \"10.0.0.1:5001\"\nsecret = \"0123456789abcdef\"",
                    "cache.s3.peers.advertise",
                    "http",
                ),
                (
                    "listen = \"127.0.0.1:5000\"\nadvertise = \"http://10.0.0.1:5001\"\nsecret = \"0123456789abcdef\"",
                    "cache.s3.peers.listen",
                    "differ",
                ),
                (
                    "listen = \"0.0.0.0:5080\"\nadvertise = \"http://10.0.0.1:5080\"\nsecret = \"0123456789abcdef\"",
                    "cache.s3.peers.listen",
                    "admin.listen",
                ),
                (&format!("{good}secret = \"short-secret\""), "cache.s3.peers.secret", "16 bytes"),
                (good, "cache.s3.peers.secret", "needed"),
                (
                    &format!("{good}secret = \"0123456789abcdef\"\nsecret_file = \"secret\""),
                    "cache.s3.peers.secret_file",
                    "exclusive",
                ),
            ] {
                jail.create_file("bad.toml", &format!("{base}{body}\n"))?;
                let e = Config::load(Some(Path::new("bad.toml")))
                    .unwrap_err()
                    .to_string();
                assert!(e.contains(key) && e.contains(why), "{body}: {e}");
                assert!(!e.contains("short-secret"), "the secret is never shown: {e}");
            }
        Ok(())
    });
}

#[test]
fn secrets_are_redacted_in_debug() {
    let mut up = UpstreamConfig::docker_hub();
    up.username = Some("me".into());
    up.password = Some(Secret("hunter2".into()));
    assert!(!format!("{up:?}").contains("hunter2"));
}

#[test]
fn the_admin_api_from_a_file_and_the_environment() {
    Jail::expect_with(|jail| {
        let c = Config::load(None).unwrap();
        assert_eq!(c.admin.listen.unwrap().to_string(), "127.0.0.1:5080");
        assert!(c.admin.token().unwrap().is_none());

        jail.create_file("t", "s3cret\n")?;
        jail.create_file(
            "a.toml",
            "[admin]\nlisten = \"127.0.0.1:6080\"\ntoken_file = \"t\"\n",
        )?;
        let c = Config::load(Some(Path::new("a.toml"))).unwrap();
        assert_eq!(c.admin.listen.unwrap().port(), 6080);
        assert_eq!(c.admin.token().unwrap().unwrap().0, "s3cret");

        jail.set_env("OCICACHE_ADMIN__LISTEN", "");
        jail.set_env("OCICACHE_ADMIN__TOKEN", "hunter2");
        jail.create_file("b.toml", "")?;
        let c = Config::load(Some(Path::new("b.toml"))).unwrap();
        assert!(c.admin.listen.is_none(), "\"\" turns the admin API off");
        assert_eq!(c.admin.token().unwrap().unwrap().0, "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
        jail.clear_env();

        for (body, key) in [
            ("listen = \"127.0.0.1:5000\"", "admin.listen"),
            ("listen = \"0.0.0.0:5000\"", "admin.listen"),
            ("listen = \"nowhere\"", "listen"),
            ("token = \"a\"\ntoken_file = \"t\"", "admin.token_file"),
            ("token_file = \"missing\"", "admin.token_file"),
            ("token = \" \"", "admin.token"),
            ("tokn = \"a\"", "tokn"),
        ] {
            jail.create_file("bad.toml", &format!("[admin]\n{body}\n"))?;
            let e = Config::load(Some(Path::new("bad.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{body}: {e}");
        }
        Ok(())
    });
}
