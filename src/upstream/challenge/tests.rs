use super::*;
use proptest::prelude::*;

fn ch(scheme: &str, params: &[(&str, &str)]) -> Challenge {
    Challenge {
        scheme: scheme.to_owned(),
        params: params
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

// ---- parse: well-formed headers ----

#[test]
fn docker_hub_bearer() {
    let header = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#;
    let parsed = parse(header);
    assert_eq!(
        parsed,
        vec![ch(
            "bearer",
            &[
                ("realm", "https://auth.docker.io/token"),
                ("service", "registry.docker.io"),
                ("scope", "repository:library/nginx:pull"),
            ]
        )]
    );
    let c = &parsed[0];
    assert_eq!(c.param("realm"), Some("https://auth.docker.io/token"));
    assert_eq!(c.param("REALM"), Some("https://auth.docker.io/token"));
    assert_eq!(c.param("Service"), Some("registry.docker.io"));
    assert_eq!(c.param("error"), None);
}

#[test]
fn basic_realm() {
    assert_eq!(
        parse(r#"Basic realm="Registry Realm""#),
        vec![ch("basic", &[("realm", "Registry Realm")])]
    );
}

#[test]
fn two_challenges() {
    assert_eq!(
        parse(r#"Basic realm="x", Bearer realm="y",service="z""#),
        vec![
            ch("basic", &[("realm", "x")]),
            ch("bearer", &[("realm", "y"), ("service", "z")]),
        ]
    );
}

#[test]
fn escapes_inside_quotes() {
    assert_eq!(
        parse(r#"Basic realm="a\"b""#),
        vec![ch("basic", &[("realm", "a\"b")])]
    );
    assert_eq!(
        parse(r#"Basic realm="back\\slash", x="\a\b""#),
        vec![ch("basic", &[("realm", "back\\slash"), ("x", "ab")])]
    );
    assert_eq!(
        parse(r#"Basic realm="\,\"\=""#),
        vec![ch("basic", &[("realm", ",\"=")])]
    );
}

#[test]
fn commas_and_equals_inside_quotes() {
    assert_eq!(
        parse(r#"Bearer realm="r",scope="repository:a:pull,push",service="s""#),
        vec![ch(
            "bearer",
            &[
                ("realm", "r"),
                ("scope", "repository:a:pull,push"),
                ("service", "s")
            ]
        )]
    );
    assert_eq!(
        parse(r#"Bearer realm="https://x/token?a=b,c=d", Basic realm="q, Bearer z""#),
        vec![
            ch("bearer", &[("realm", "https://x/token?a=b,c=d")]),
            ch("basic", &[("realm", "q, Bearer z")]),
        ]
    );
}

#[test]
fn unquoted_token_values() {
    assert_eq!(
        parse("Bearer realm=abc, service=registry.example.com,error=invalid_token"),
        vec![ch(
            "bearer",
            &[
                ("realm", "abc"),
                ("service", "registry.example.com"),
                ("error", "invalid_token")
            ]
        )]
    );
}

#[test]
fn extra_whitespace() {
    assert_eq!(
        parse("  Bearer   realm = \"r\" ,\t service\t=\tsvc ,  scope=\"s\"  "),
        vec![ch(
            "bearer",
            &[("realm", "r"), ("service", "svc"), ("scope", "s")]
        )]
    );
    assert_eq!(
        parse("Basic\trealm=\"x\""),
        vec![ch("basic", &[("realm", "x")])]
    );
}

#[test]
fn case_folding() {
    assert_eq!(
        parse(r#"BEARER Realm="R",SERVICE=Svc"#),
        vec![ch("bearer", &[("realm", "R"), ("service", "Svc")])]
    );
}

#[test]
fn schemes_without_params() {
    assert_eq!(parse("Basic"), vec![ch("basic", &[])]);
    assert_eq!(
        parse("Negotiate, Basic realm=\"x\""),
        vec![ch("negotiate", &[]), ch("basic", &[("realm", "x")])]
    );
    assert_eq!(
        parse("Bearer , Basic"),
        vec![ch("bearer", &[]), ch("basic", &[])]
    );
}

#[test]
fn token68_is_skipped() {
    assert_eq!(parse("Negotiate abc123=="), vec![ch("negotiate", &[])]);
    assert_eq!(
        parse("Negotiate a+b/c==, Basic realm=\"x\""),
        vec![ch("negotiate", &[]), ch("basic", &[("realm", "x")])]
    );
    assert_eq!(parse("Negotiate abc"), vec![ch("negotiate", &[])]);
    // `x=` followed by params is a param without a value, not a token68.
    assert_eq!(parse("Bearer x=, y=1"), vec![ch("bearer", &[("y", "1")])]);
    assert_eq!(
        parse("Bearer x=, Basic"),
        vec![ch("bearer", &[]), ch("basic", &[])]
    );
}

#[test]
fn rfc_9110_example() {
    let header = r#"Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple""#;
    assert_eq!(
        parse(header),
        vec![
            ch(
                "newauth",
                &[
                    ("realm", "apps"),
                    ("type", "1"),
                    ("title", "Login to \"apps\"")
                ]
            ),
            ch("basic", &[("realm", "simple")]),
        ]
    );
}

#[test]
fn empty_elements_and_loose_params() {
    assert_eq!(
        parse(", ,Basic realm=\"x\",, ,charset=UTF-8 ,,"),
        vec![ch("basic", &[("realm", "x"), ("charset", "UTF-8")])]
    );
    // Params after a comma right behind the scheme belong to it.
    assert_eq!(
        parse("Basic, realm=\"x\""),
        vec![ch("basic", &[("realm", "x")])]
    );
}

#[test]
fn empty_quoted_value_and_unicode() {
    assert_eq!(
        parse(r#"Bearer realm="", service="réseau ☃""#),
        vec![ch("bearer", &[("realm", ""), ("service", "réseau ☃")])]
    );
    // A backslash before a multi-byte character escapes it whole.
    assert_eq!(
        parse("Bearer realm=\"\\é\""),
        vec![ch("bearer", &[("realm", "é")])]
    );
}

#[test]
fn duplicate_params_are_kept_first_wins() {
    let parsed = parse(r#"Bearer realm="a", REALM="b""#);
    assert_eq!(
        parsed,
        vec![ch("bearer", &[("realm", "a"), ("realm", "b")])]
    );
    assert_eq!(parsed[0].param("realm"), Some("a"));
}

// ---- parse: empty, malformed, hostile ----

#[test]
fn empty_and_blank_headers() {
    for header in ["", " ", "\t", ",", " , , "] {
        assert_eq!(parse(header), vec![], "{header:?}");
    }
}

#[test]
fn garbage_yields_nothing() {
    for header in [
        "\"",
        "\"\"",
        "=",
        "==,==",
        "=Bearer",
        "realm=\"x\"",
        "@@@",
        "\"Bearer realm=x\"",
        "(Basic)",
        "\u{0}\u{1}\u{7f}",
        "☃",
    ] {
        assert_eq!(parse(header), vec![], "{header:?}");
    }
}

#[test]
fn malformed_params_are_skipped() {
    // Missing value, junk after a quoted value, bad token value.
    assert_eq!(
        parse(r#"Bearer realm=, service="s""#),
        vec![ch("bearer", &[("service", "s")])]
    );
    assert_eq!(
        parse(r#"Bearer realm="r"junk, service="s""#),
        vec![ch("bearer", &[("service", "s")])]
    );
    assert_eq!(
        parse(r#"Bearer realm=a b, service="s""#),
        vec![ch("bearer", &[("service", "s")])]
    );
    assert_eq!(
        parse(r#"Bearer realm=@, service="s""#),
        vec![ch("bearer", &[("service", "s")])]
    );
    // A control character inside quotes spoils that param only.
    assert_eq!(
        parse("Bearer realm=\"a\u{1}b\", service=\"s\""),
        vec![ch("bearer", &[("service", "s")])]
    );
    // Junk right after the scheme.
    assert_eq!(
        parse(r#"Bearer "junk, with comma", realm="r""#),
        vec![ch("bearer", &[("realm", "r")])]
    );
    assert_eq!(
        parse("Basic junk junk, Bearer realm=\"r\""),
        vec![ch("basic", &[]), ch("bearer", &[("realm", "r")])]
    );
}

#[test]
fn unterminated_quotes() {
    assert_eq!(
        parse(r#"Bearer realm="https://x, service="s""#),
        vec![ch("bearer", &[])]
    );
    assert_eq!(
        parse(r#"Basic realm="x", Bearer realm="y"#),
        vec![ch("basic", &[("realm", "x")]), ch("bearer", &[])]
    );
    assert_eq!(parse(r#"Basic realm="x\"#), vec![ch("basic", &[])]);
}

#[test]
fn junk_between_challenges_is_skipped() {
    assert_eq!(
        parse(r#"Basic realm="x", "junk", =, Bearer realm="y""#),
        vec![
            ch("basic", &[("realm", "x")]),
            ch("bearer", &[("realm", "y")])
        ]
    );
    assert_eq!(
        parse(r#"Basic"glued", Bearer realm="y""#),
        vec![ch("bearer", &[("realm", "y")])]
    );
}

#[test]
fn size_limits() {
    let long_value = "a".repeat(MAX_HEADER_LEN);
    assert_eq!(parse(&format!("Bearer realm=\"{long_value}\"")), vec![]);

    let padded = format!("Bearer realm=\"x\"{}", " ".repeat(MAX_HEADER_LEN - 16));
    assert_eq!(padded.len(), MAX_HEADER_LEN);
    assert_eq!(parse(&padded), vec![ch("bearer", &[("realm", "x")])]);

    let many_params: Vec<String> = (0..200).map(|i| format!("p{i}={i}")).collect();
    let parsed = parse(&format!("Bearer {}", many_params.join(",")));
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].params.len(), MAX_PARAMS);
    assert_eq!(parsed[0].param("p0"), Some("0"));
    assert_eq!(parsed[0].param("p100"), None);

    let many_challenges = vec!["Basic realm=\"x\""; 100].join(", ");
    assert_eq!(parse(&many_challenges).len(), MAX_CHALLENGES);

    let commas = ",".repeat(MAX_HEADER_LEN);
    assert_eq!(parse(&commas), vec![]);
    let quotes = "\"".repeat(MAX_HEADER_LEN);
    assert_eq!(parse(&quotes), vec![]);
    let backslashes = format!("Basic realm=\"{}", "\\".repeat(MAX_HEADER_LEN - 20));
    assert_eq!(parse(&backslashes), vec![ch("basic", &[])]);
}

// ---- token responses ----

#[test]
fn token_response_token_field() {
    let r = parse_token_response(
        br#"{"token":"abc","expires_in":300,"issued_at":"2024-01-01T00:00:00Z"}"#,
    )
    .unwrap();
    assert_eq!(r.token, "abc");
    assert_eq!(r.expires_in, Duration::from_secs(300));
}

#[test]
fn token_response_access_token_and_precedence() {
    let r = parse_token_response(br#"{"access_token":"oauth"}"#).unwrap();
    assert_eq!(r.token, "oauth");
    let r = parse_token_response(br#"{"token":"t","access_token":"a"}"#).unwrap();
    assert_eq!(r.token, "t");
    let r = parse_token_response(br#"{"token":"","access_token":"a"}"#).unwrap();
    assert_eq!(r.token, "a");
    let r = parse_token_response(br#"{"token":null,"access_token":"a"}"#).unwrap();
    assert_eq!(r.token, "a");
    let r = parse_token_response(br#"{"token":"t","access_token":""}"#).unwrap();
    assert_eq!(r.token, "t");
}

#[test]
fn token_response_missing() {
    for body in [
        &br#"{}"#[..],
        br#"{"token":""}"#,
        br#"{"token":"","access_token":""}"#,
        br#"{"token":null,"access_token":null}"#,
        br#"{"token":"   "}"#,
        br#"{"expires_in":300,"other":{"token":"nested"}}"#,
    ] {
        assert_eq!(
            parse_token_response(body),
            Err(TokenError::Missing),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn token_response_expires_in() {
    let secs = |body: &str| parse_token_response(body.as_bytes()).unwrap().expires_in;
    assert_eq!(secs(r#"{"token":"t"}"#), Duration::from_secs(60));
    assert_eq!(
        secs(r#"{"token":"t","expires_in":null}"#),
        Duration::from_secs(60)
    );
    assert_eq!(
        secs(r#"{"token":"t","expires_in":0}"#),
        Duration::from_secs(60)
    );
    assert_eq!(
        secs(r#"{"token":"t","expires_in":30}"#),
        Duration::from_secs(60)
    );
    assert_eq!(
        secs(r#"{"token":"t","expires_in":-5}"#),
        Duration::from_secs(60)
    );
    assert_eq!(
        secs(r#"{"token":"t","expires_in":61}"#),
        Duration::from_secs(61)
    );
    assert_eq!(
        secs(r#"{"token":"t","expires_in":3600}"#),
        Duration::from_secs(3600)
    );
    assert_eq!(
        secs(r#"{"token":"t","expires_in":120.9}"#),
        Duration::from_secs(120)
    );
    assert_eq!(
        secs(r#"{"token":"t","expires_in":"300"}"#),
        Duration::from_secs(60)
    );
    assert_eq!(
        secs(r#"{"token":"t","expires_in":[1]}"#),
        Duration::from_secs(60)
    );
    assert_eq!(
        secs(r#"{"token":"t","expires_in":18446744073709551615}"#),
        MAX_EXPIRES_IN
    );
    assert_eq!(secs(r#"{"token":"t","expires_in":1e300}"#), MAX_EXPIRES_IN);
    assert_eq!(
        secs(r#"{"token":"t","expires_in":99999999999999999999999}"#),
        MAX_EXPIRES_IN
    );
}

#[test]
fn token_response_bad_json() {
    for body in [
        &b""[..],
        b"not json",
        b"{",
        b"[]",
        b"null",
        b"42",
        br#""just-a-string""#,
        br#"{"token":42}"#,
        br#"{"token":"a","token":"b"}"#,
        b"\xff\xfe",
    ] {
        assert!(
            matches!(parse_token_response(body), Err(TokenError::Json(_))),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    let too_big = format!(r#"{{"token":"{}"}}"#, "a".repeat(MAX_TOKEN_RESPONSE_LEN));
    assert!(matches!(
        parse_token_response(too_big.as_bytes()),
        Err(TokenError::Json(_))
    ));
}

#[test]
fn token_error_messages_do_not_echo_the_body() {
    for body in [
        &br#""secret-token-value""#[..],
        br#"{"token":"secret-token-value","expires_in":"secret-token-value"x"#,
        br#"["secret-token-value"]"#,
    ] {
        let err = parse_token_response(body).unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}

#[test]
fn token_debug_is_redacted() {
    let r = parse_token_response(br#"{"token":"s3cr3t-value","expires_in":120}"#).unwrap();
    let shown = format!("{r:?} {r:#?}");
    assert!(!shown.contains("s3cr3t"), "{shown}");
    assert!(shown.contains("REDACTED"), "{shown}");
    assert!(shown.contains("120s"), "{shown}");
}

#[test]
fn token_response_deep_nesting_does_not_crash() {
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    // Unknown fields are skipped without recursion...
    let body = format!(r#"{{"token":"t","x":{nested}}}"#);
    assert_eq!(parse_token_response(body.as_bytes()).unwrap().token, "t");
    // ...and `expires_in`, read as a JSON value, hits serde_json's depth limit.
    let body = format!(r#"{{"token":"t","expires_in":{nested}}}"#);
    assert!(matches!(
        parse_token_response(body.as_bytes()),
        Err(TokenError::Json(_))
    ));
}

// ---- properties ----

const TOKEN_RE: &str = "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}";

/// Any value a quoted-string can carry: printable ASCII (including `"`,
/// `\`, `,` and `=`), SP, HTAB and non-ASCII characters.
fn arb_value() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::char::range(' ', '~'),
            1 => Just('\t'),
            1 => prop::char::range('\u{80}', '\u{10ffff}'),
        ],
        0..24,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

/// Params with distinct (case-insensitive) names.
fn arb_params() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((TOKEN_RE, arb_value()), 0..8).prop_map(|params| {
        let mut seen = Vec::<String>::new();
        params
            .into_iter()
            .filter(|(name, _)| {
                let lower = name.to_ascii_lowercase();
                let fresh = !seen.contains(&lower);
                seen.push(lower);
                fresh
            })
            .collect()
    })
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[derive(Debug, Clone)]
struct Style {
    space_after_scheme: &'static str,
    around_eq: &'static str,
    separator: &'static str,
    bare_tokens: bool,
}

fn arb_style() -> impl Strategy<Value = Style> {
    (
        prop::sample::select(vec![" ", "  ", "\t", " \t "]),
        prop::sample::select(vec!["", " ", "\t"]),
        prop::sample::select(vec![",", ", ", " , ", ",\t", ", ,", ",,"]),
        any::<bool>(),
    )
        .prop_map(
            |(space_after_scheme, around_eq, separator, bare_tokens)| Style {
                space_after_scheme,
                around_eq,
                separator,
                bare_tokens,
            },
        )
}

fn render(scheme: &str, params: &[(String, String)], style: &Style) -> String {
    let mut out = scheme.to_owned();
    for (i, (name, value)) in params.iter().enumerate() {
        out.push_str(if i == 0 {
            style.space_after_scheme
        } else {
            style.separator
        });
        let value = if style.bare_tokens && is_token(value) {
            value.clone()
        } else {
            quote(value)
        };
        out.push_str(&format!("{name}{eq}={eq}{value}", eq = style.around_eq));
    }
    out
}

proptest! {
    #[test]
    fn parse_never_panics(header in any::<String>()) {
        let parsed = parse(&header);
        prop_assert!(parsed.len() <= MAX_CHALLENGES);
        prop_assert!(parsed.iter().all(|c| c.params.len() <= MAX_PARAMS));
    }

    #[test]
    fn parse_never_panics_on_headerish_input(
        header in "[a-zA-Z =,\"\\\\\t!~é]{0,200}",
    ) {
        for c in parse(&header) {
            prop_assert!(is_token(&c.scheme));
            prop_assert_eq!(c.scheme.to_ascii_lowercase(), c.scheme.clone());
            for (name, _) in &c.params {
                prop_assert!(is_token(name));
                prop_assert_eq!(&name.to_ascii_lowercase(), name);
            }
        }
    }

    #[test]
    fn rendered_challenge_parses_back(
        scheme in TOKEN_RE,
        params in arb_params(),
        style in arb_style(),
    ) {
        let header = render(&scheme, &params, &style);
        let expected = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: params
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
                .collect(),
        };
        let parsed = parse(&header);
        prop_assert_eq!(&parsed, &vec![expected.clone()], "header: {:?}", header);
        for (name, value) in &params {
            prop_assert_eq!(parsed[0].param(name), Some(value.as_str()));
        }
    }

    #[test]
    fn rendered_challenges_parse_back(
        challenges in prop::collection::vec((TOKEN_RE, arb_params(), arb_style()), 1..5),
        join in prop::sample::select(vec![",", ", ", " ,\t", ", , "]),
    ) {
        let header = challenges
            .iter()
            .map(|(scheme, params, style)| render(scheme, params, style))
            .collect::<Vec<_>>()
            .join(join);
        let expected: Vec<Challenge> = challenges
            .iter()
            .map(|(scheme, params, _)| Challenge {
                scheme: scheme.to_ascii_lowercase(),
                params: params
                    .iter()
                    .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
                    .collect(),
            })
            .collect();
        prop_assert_eq!(parse(&header), expected, "header: {:?}", header);
    }

    #[test]
    fn token_response_never_panics(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_token_response(&body);
    }

    #[test]
    fn token_response_round_trip(
        token in "[ -~]{0,40}",
        access in proptest::option::of("[ -~]{0,40}"),
        expires in proptest::option::of(any::<i64>()),
    ) {
        let mut obj = serde_json::Map::new();
        obj.insert("token".into(), token.clone().into());
        if let Some(a) = &access {
            obj.insert("access_token".into(), a.clone().into());
        }
        if let Some(e) = expires {
            obj.insert("expires_in".into(), e.into());
        }
        let body = serde_json::to_vec(&serde_json::Value::Object(obj)).unwrap();
        let result = parse_token_response(&body);
        let want = if !token.trim().is_empty() {
            Some(token)
        } else {
            access.filter(|a| !a.trim().is_empty())
        };
        match want {
            None => prop_assert_eq!(result, Err(TokenError::Missing)),
            Some(want) => {
                let r = result.unwrap();
                prop_assert_eq!(r.token, want);
                let secs = expires.unwrap_or(0).clamp(60, 86_400);
                prop_assert_eq!(r.expires_in, Duration::from_secs(secs as u64));
            }
        }
    }
}
