//! Property tests over everything courier reads from outside: arbitrary bytes and
//! near-valid inputs for each parser, checked by the same functions the fuzz targets use
//! (`courier::fuzzing`). A few hundred cases each; the whole file runs in seconds.

use courier::fuzzing;
use proptest::prelude::*;

/// Text that looks like a message id: often ordinary, sometimes slashes, dots, percent signs,
/// quotes, Unicode and control characters.
fn id_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{1,12}",
        "[./%?#\\\\ \"]{1,6}",
        "\\PC{0,8}",
        any::<String>(),
        Just(".".to_string()),
        Just("..".to_string()),
    ]
}

/// A JSON value that stands where a number or a time should.
fn odd_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| f.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just("1e308".to_string()),
        Just("-1e308".to_string()),
        Just("1e20".to_string()),
        Just("null".to_string()),
        any::<String>().prop_map(|s| serde_json::Value::from(s).to_string()),
        Just("\"9999-12-31T23:59:59Z\"".to_string()),
        Just("\"-0001-01-01T00:00:00Z\"".to_string()),
    ]
}

/// A `traceparent` value: near-valid (any case, any version), or anything else.
fn traceparent_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "\"[0-9a-fA-F]{2}-[0-9a-f0]{32}-[0-9a-fA-F0]{16}-[0-9a-f]{2}(-[a-z]{0,3})?\"",
        odd_value(),
    ]
}

/// A queue item close to the documented format, fields in any combination.
fn near_message() -> impl Strategy<Value = Vec<u8>> {
    (
        id_text(),
        proptest::option::of(odd_value()),
        proptest::option::of(odd_value()),
        proptest::option::of("\\PC{0,20}"),
        " {0,2}",
        proptest::option::of(traceparent_value()),
    )
        .prop_map(|(id, attempts, queued_at, payload, space, traceparent)| {
            let mut fields = vec![format!("\"message_id\":{}", serde_json::Value::from(id))];
            if let Some(a) = attempts {
                fields.push(format!("\"attempt_count\":{space}{a}"));
            }
            if let Some(q) = queued_at {
                fields.push(format!("\"queued_at\":{q}"));
            }
            if let Some(p) = payload {
                fields.push(format!("\"payload\":{}", serde_json::Value::from(p)));
            }
            if let Some(t) = traceparent {
                fields.push(format!("\"traceparent\":{t}"));
            }
            format!("{space}{{{}}}", fields.join(",")).into_bytes()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn queue_items_near_the_format_never_panic_and_keep_their_contract(item in near_message()) {
        fuzzing::queue_item(&item);
    }

    #[test]
    fn arbitrary_queue_items_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        fuzzing::queue_item(&bytes);
    }

    #[test]
    fn dead_letter_records_of_any_bytes_read_back(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        fuzzing::dead_letter_record(&bytes);
    }

    #[test]
    fn earlier_and_foreign_dead_letter_shapes_read(text in "\\{\"reason\":\"[a-z]{0,5}\"(,\"message\":\"\\PC{0,10}\")?\\}(\n\\PC{0,10})?") {
        fuzzing::dead_letter_record(text.as_bytes());
    }

    #[test]
    fn retry_after_values_are_parsed_or_ignored_never_over_the_cap(
        text in prop_oneof![any::<u64>().prop_map(|n| n.to_string()), "\\PC{0,40}", "[A-Z][a-z]{2}, [0-9]{2} [A-Z][a-z]{2} [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"]
    ) {
        fuzzing::retry_after(text.as_bytes());
    }

    #[test]
    fn config_files_load_or_are_refused_with_one_line(
        section in "redis|worker|tls|metrics|logging|[a-z]{1,6}",
        key in "port|password|concurrency|host|level|max_message_bytes|[a-z_]{1,8}",
        value in prop_oneof!["\\PC{0,20}", odd_value(), Just("\"${SOME_VAR}\"".to_string()), Just("${REDIS_PASSWORD}".to_string()), Just("\"${UNSET_VAR}\"".to_string())],
    ) {
        fuzzing::config_text(format!("{section}:\n  {key}: {value}\n").as_bytes());
    }

    #[test]
    fn redis_urls_load_plain_or_are_refused_with_one_line(
        scheme in "redis|rediss|http|[a-z]{1,6}",
        user in "(courier(:[a-z0-9%]{1,10})?@)?",
        host in "127\\.0\\.0\\.1|h|\\[::1\\]|",
        port in "(:[0-9]{1,6})?",
        path in "(/[0-9a-z]{0,3})?",
        tail in "(\\?[a-z=&0-9]{0,12})?(#[a-z]{0,8})?",
    ) {
        fuzzing::redis_url(format!("{scheme}://{user}{host}{port}{path}{tail}").as_bytes());
    }

    #[test]
    fn worker_numbers_and_outcomes_load_usable_or_are_refused_with_one_line(
        text in prop_oneof![
            "[-+]?[0-9]{0,4}(\\.[0-9]{0,4})?([eE][-+]?[0-9]{1,3})?",
            Just("1e-20".to_string()),
            Just("NaN".to_string()),
            Just("inf".to_string()),
            "([0-9]{1,3}(-[0-9]{1,3})?=(delivered|retry|reject|x)[, ]{0,2}){0,4}",
        ],
    ) {
        fuzzing::worker_numbers(text.as_bytes());
    }

    #[test]
    fn arbitrary_config_text_never_panics(text in "\\PC{0,80}") {
        fuzzing::config_text(text.as_bytes());
    }

    #[test]
    fn answers_near_http_read_the_same_in_any_pieces(answer in near_answer()) {
        fuzzing::http_answer(&answer);
    }

    #[test]
    fn arbitrary_answers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        fuzzing::http_answer(&bytes);
    }

    #[test]
    fn answers_near_http_read_as_hyper_reads_them(
        answers in proptest::collection::vec(near_answer(), 1..4),
        config in any::<u8>(),
    ) {
        // Each answer's own first byte (near_answer's read size) is dropped: one config byte
        // leads, the answers follow separated as the differential expects.
        let mut input = vec![config];
        for (n, answer) in answers.iter().enumerate() {
            if n > 0 {
                input.extend_from_slice(b"\0\0");
            }
            input.extend_from_slice(answer.get(1..).unwrap_or_default());
        }
        fuzzing::http_differential(&input);
    }
}

/// The differential's seeds, among them the inputs on which courier and hyper once disagreed.
#[test]
fn differential_seeds_read_as_hyper_reads_them() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/http_differential");
    let mut read = 0;
    for entry in std::fs::read_dir(&seeds).expect("the seeds") {
        let path = entry.expect("a seed").path();
        fuzzing::http_differential(&std::fs::read(&path).expect("a seed's bytes"));
        read += 1;
    }
    assert!(read >= 6, "{read} seeds");
}

/// Inputs the fuzzers and these properties found, kept as regressions.
#[test]
fn inputs_found_by_fuzzing_stay_fixed() {
    // `"attempt_count": null` read as absent: the retried copy carried two attempt_counts.
    fuzzing::queue_item(br#"  {"message_id":"m","attempt_count":  null,"payload":"x"}"#);
    // A number out of f64 range in a field courier does not read: kept and forwarded as is.
    fuzzing::queue_item(b"{\"message_id\":\"m-1\",\"anv\"\t\t\t\t\t\t:9e004005}");
    // An id that happens to be the text of the header fallback.
    fuzzing::queue_item(br#"{"message_id":"invalid","queouc,ut":null}"#);
}

/// An answer close to what a main server sends: a status line, some of the headers that decide
/// the framing, and a body that may or may not match them.
fn near_answer() -> impl Strategy<Value = Vec<u8>> {
    let header = prop_oneof![
        (0u64..100).prop_map(|n| format!("Content-Length: {n}\r\n")),
        Just("Content-Length: 3, 4\r\n".to_string()),
        Just("Transfer-Encoding: chunked\r\n".to_string()),
        Just("Transfer-Encoding: gzip\r\n".to_string()),
        Just("Connection: close\r\n".to_string()),
        Just("Retry-After: 5\r\n".to_string()),
        "[A-Za-z-]{1,8}: [ -~]{0,12}\r\n",
    ];
    let body = prop_oneof![
        "[ -~]{0,40}",
        Just("5\r\nhello\r\n0\r\n\r\n".to_string()),
        Just("3;ext\r\nabc\r\n0\r\nT: x\r\n\r\n".to_string()),
        Just("zz\r\n".to_string()),
        Just("4\r\nabcdef\r\n".to_string()),
    ];
    (
        prop_oneof![Just("HTTP/1.1"), Just("HTTP/1.0")],
        prop_oneof![
            Just(200u16),
            Just(204),
            Just(100),
            Just(101),
            Just(304),
            Just(429),
            Just(503),
            100u16..1000
        ],
        proptest::collection::vec(header, 0..4),
        body,
        any::<u8>(),
    )
        .prop_map(|(version, status, headers, body, first)| {
            let mut answer = vec![first];
            answer.extend_from_slice(format!("{version} {status} X\r\n{}\r\n{body}", headers.concat()).as_bytes());
            answer
        })
}
