//! Every rule the simulator enforces and every fault it can play, over real HTTP on loopback:
//! the daemon's tests trust these answers to be Wazzup's.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wazzup_sim::{Fault, PhoneCheck, Simulator};

const TOKEN: &str = "tok-1";

async fn sim() -> Simulator {
    let sim = Simulator::start("127.0.0.1:0", false).await.unwrap();
    sim.add_account(TOKEN);
    sim
}

/// One request: its status (0 when the answer broke off before it), its `Retry-After`, and its
/// body as JSON (Null when it is not JSON or breaks off).
async fn call(
    sim: &Simulator,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", sim.url()));
    if !token.is_empty() {
        req = req.bearer_auth(token);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    // A broken answer may break before its status line arrives: status 0.
    let Ok(resp) = req.send().await else {
        return (0, None, Value::Null);
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = match resp.bytes().await {
        Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    (status, retry_after, body)
}

async fn post_users(sim: &Simulator, users: Value) -> (u16, Value) {
    let (status, _, body) = call(
        sim,
        TOKEN,
        reqwest::Method::POST,
        "/v2/users",
        Some(json!({ "users": users })),
    )
    .await;
    (status, body)
}

async fn patch_settings(sim: &Simulator, doc: Value) -> (u16, Value) {
    let (status, _, body) = call(
        sim,
        TOKEN,
        reqwest::Method::PATCH,
        "/v2/settings",
        Some(doc),
    )
    .await;
    (status, body)
}

fn users(n: usize) -> Value {
    Value::Array(
        (0..n)
            .map(|i| json!({ "id": format!("u{i}"), "name": format!("User {i}") }))
            .collect(),
    )
}

#[tokio::test]
async fn a_request_takes_at_most_100_users_and_answers_how_many_it_processed() {
    let sim = sim().await;
    let (status, body) = post_users(&sim, users(101)).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "TOO_MANY_ENTITIES");
    assert!(
        sim.users(TOKEN).is_empty(),
        "nothing of a refused request is stored"
    );
    let (status, body) = post_users(&sim, users(100)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["processed"], 100);
    assert!(body["meta"]["timestamp"].is_i64());
    assert_eq!(sim.users(TOKEN).len(), 100);
}

#[tokio::test]
async fn ids_up_to_64_and_names_up_to_150_characters_pass_and_longer_ones_are_named_by_index() {
    let sim = sim().await;
    let id64 = "ā".repeat(64);
    let name150 = "ž".repeat(150);
    let (status, body) = post_users(&sim, json!([{ "id": id64, "name": name150 }])).await;
    assert_eq!(status, 200, "characters are counted, not bytes: {body}");
    let (status, body) = post_users(
        &sim,
        json!([
            { "id": "ok", "name": "Fine" },
            { "id": "x".repeat(65), "name": "Long id" },
            { "id": "long-name", "name": "n".repeat(151) },
            { "id": "", "name": "" },
        ]),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "INVALID_USER_DATA");
    assert_eq!(
        body["data"],
        json!([
            { "index": 1, "fields": ["id"] },
            { "index": 2, "fields": ["name"] },
            { "index": 3, "fields": ["id", "name"] },
        ])
    );
    assert!(
        !sim.users(TOKEN).contains_key("ok"),
        "the whole request is refused"
    );
    let (status, body) = post_users(&sim, json!([])).await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("INVALID_USER_DATA"))
    );
}

#[tokio::test]
async fn a_duplicated_id_is_a_500_and_a_malformed_phone_is_dropped() {
    let sim = sim().await;
    let (status, _) = post_users(
        &sim,
        json!([{ "id": "a", "name": "A" }, { "id": "a", "name": "A again" }]),
    )
    .await;
    assert_eq!(status, 500);
    assert!(sim.users(TOKEN).is_empty());
    let (status, _) = post_users(
        &sim,
        json!([
            { "id": "short", "name": "S", "phone": "1234567" },
            { "id": "plus", "name": "P", "phone": "+37126123456" },
            { "id": "good", "name": "G", "phone": "37126123456" },
        ]),
    )
    .await;
    assert_eq!(status, 200);
    let stored = sim.users(TOKEN);
    assert_eq!(stored["short"].phone, None);
    assert_eq!(stored["plus"].phone, None);
    assert_eq!(stored["good"].phone.as_deref(), Some("37126123456"));
}

#[tokio::test]
async fn phones_are_unique_per_account_checked_per_request_or_user_by_user() {
    let sim = sim().await;
    let pair = json!([
        { "id": "a", "name": "A", "phone": "37120000001" },
        { "id": "b", "name": "B", "phone": "37120000002" },
    ]);
    assert_eq!(post_users(&sim, pair).await.0, 200);
    let taken = json!([{ "id": "c", "name": "C", "phone": "37120000001" }]);
    let (status, body) = post_users(&sim, taken.clone()).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "USER_ALREADY_EXISTS");
    assert!(
        body["description"]
            .as_str()
            .unwrap()
            .contains("37120000001")
    );
    let swap = json!([
        { "id": "a", "name": "A", "phone": "37120000002" },
        { "id": "b", "name": "B", "phone": "37120000001" },
    ]);

    // User by user, the first of a swap meets the phone its partner still holds.
    sim.set_phone_check(PhoneCheck::PerUser);
    let (status, body) = post_users(&sim, swap.clone()).await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("USER_ALREADY_EXISTS"))
    );
    assert_eq!(sim.users(TOKEN)["a"].phone.as_deref(), Some("37120000001"));
    assert_eq!(post_users(&sim, taken.clone()).await.0, 400);

    // Over the whole request, a swap is fine.
    sim.set_phone_check(PhoneCheck::Request);
    assert_eq!(post_users(&sim, swap).await.0, 200);
    assert_eq!(sim.users(TOKEN)["a"].phone.as_deref(), Some("37120000002"));
    assert_eq!(sim.users(TOKEN)["b"].phone.as_deref(), Some("37120000001"));
    let (status, _) = post_users(
        &sim,
        json!([
            { "id": "d", "name": "D", "phone": "37120000009" },
            { "id": "e", "name": "E", "phone": "37120000009" },
        ]),
    )
    .await;
    assert_eq!(status, 400, "two new users of one request with one phone");
}

#[tokio::test]
async fn an_account_holds_at_most_its_user_limit_and_updates_pass_at_the_limit() {
    let sim = sim().await;
    assert_eq!(wazzup_sim::USER_LIMIT, 1000);
    assert_eq!(post_users(&sim, users(100)).await.0, 200);
    sim.set_user_limit(TOKEN, 100);
    let (status, body) = post_users(&sim, json!([{ "id": "u100", "name": "One more" }])).await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("USER_LIMIT_EXCEEDED"))
    );
    let rename = json!([{ "id": "u1", "name": "Renamed" }]);
    assert_eq!(post_users(&sim, rename).await.0, 200);
    assert_eq!(sim.users(TOKEN)["u1"].name, "Renamed");
    // PATCH updates existing users only: an unknown one is not created.
    let (status, _, body) = call(
        &sim,
        TOKEN,
        reqwest::Method::PATCH,
        "/v2/users",
        Some(json!({ "users": [{ "id": "u2", "name": "Two" }, { "id": "new", "name": "New" }] })),
    )
    .await;
    assert_eq!((status, body["data"]["processed"].clone()), (200, json!(1)));
    assert!(!sim.users(TOKEN).contains_key("new"));
}

#[tokio::test]
async fn settings_may_name_only_users_the_account_holds_and_a_delete_takes_them_out() {
    let sim = sim().await;
    assert_eq!(post_users(&sim, users(2)).await.0, 200);
    let role = |user: &str, channel: &str| json!({ "user_id": user, "channel_id": channel, "role": "manager", "allow_get_new_clients": true });
    let doc = |roles: Value, hidden: Value| {
        json!({ "user_roles": roles, "hide_phone_numbers_for_user_ids": hidden,
                "push_input_output_message_events_for_managers": false })
    };
    let (status, body) = patch_settings(&sim, doc(json!([role("ghost", "c1")]), json!([]))).await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("USER_NOT_FOUND"))
    );
    let (status, _) = patch_settings(&sim, doc(json!([]), json!(["ghost"]))).await;
    assert_eq!(status, 400, "a hidden-phone entry for an unknown user");
    let (status, body) = patch_settings(&sim, doc(json!([role("u0", "")]), json!([]))).await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("INVALID_SETTINGS"))
    );
    let (status, body) = patch_settings(&sim, json!({ "user_roles": "nope" })).await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("INVALID_SETTINGS"))
    );
    assert!(
        sim.settings(TOKEN).user_roles.is_empty(),
        "nothing refused was stored"
    );

    let good = doc(json!([role("u0", "c1"), role("u1", "c1")]), json!(["u1"]));
    assert_eq!(patch_settings(&sim, good).await.0, 200);
    assert_eq!(sim.settings(TOKEN).user_roles.len(), 2);
    let (_, _, read) = call(&sim, TOKEN, reqwest::Method::GET, "/v2/settings", None).await;
    assert_eq!(read["user_roles"].as_array().unwrap().len(), 2);

    let delete = |ids: Value| {
        call(
            &sim,
            TOKEN,
            reqwest::Method::DELETE,
            "/v2/users",
            Some(json!({ "user_ids": ids })),
        )
    };
    let too_many: Vec<String> = (0..101).map(|i| format!("x{i}")).collect();
    let (status, _, body) = delete(json!(too_many)).await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("TOO_MANY_ENTITIES"))
    );
    assert_eq!(delete(json!(["u1"])).await.0, 200);
    let settings = sim.settings(TOKEN);
    assert_eq!(
        settings.user_roles.len(),
        1,
        "the deleted user's roles went with it"
    );
    assert!(settings.hide_phone_numbers_for_user_ids.is_empty());
    assert!(!sim.users(TOKEN).contains_key("u1"));
}

#[tokio::test]
async fn users_are_read_by_pages_of_at_most_100_and_one_by_id() {
    let sim = sim().await;
    for chunk in 0..3 {
        let batch: Vec<Value> = (0..100)
            .map(|i| json!({ "id": format!("u{:03}", chunk * 100 + i), "name": "N" }))
            .collect();
        assert_eq!(post_users(&sim, Value::Array(batch)).await.0, 200);
    }
    let page = |q: &'static str| call(&sim, TOKEN, reqwest::Method::GET, q, None);
    let (_, _, body) = page("/v2/users?offset=0&limit=500").await;
    assert_eq!(
        body["data"].as_array().unwrap().len(),
        100,
        "at most 100 per page"
    );
    let (_, _, body) = page("/v2/users?offset=250&limit=100").await;
    assert_eq!(body["data"].as_array().unwrap().len(), 50);
    assert_eq!(body["data"][0]["id"], "u250");
    let (_, _, body) = page("/v2/users/u007").await;
    assert_eq!(body["data"][0]["id"], "u007");
    let (_, _, body) = page("/v2/users/none").await;
    assert_eq!(body["data"], json!([]));
}

#[tokio::test]
async fn a_token_gets_500_requests_in_5_s_and_then_429_until_its_window_resets() {
    let sim = sim().await;
    sim.add_account("tok-2");
    let get = |token: &'static str| call(&sim, token, reqwest::Method::GET, "/v2/settings", None);
    let started = Instant::now();
    for n in 1..=500 {
        assert_eq!(get(TOKEN).await.0, 200, "request {n}");
    }
    let (status, retry_after, body) = get(TOKEN).await;
    if started.elapsed() < Duration::from_secs(5) {
        assert_eq!(status, 429, "the 501st request within 5 s");
        assert_eq!(body["error"], "TOO_MANY_REQUESTS");
        let wait: u64 = retry_after.unwrap().parse().unwrap();
        assert!((1..=5).contains(&wait), "{wait}");
        assert_eq!(
            get("tok-2").await.0,
            200,
            "another token has its own counter"
        );
    }

    // A short window shows the reset.
    sim.set_rate_limit(Some((3, Duration::from_millis(500))));
    let statuses = futures_statuses(&sim, 4).await;
    assert_eq!(statuses, [200, 200, 200, 429]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get(TOKEN).await.0, 200, "the counter reset with the window");
}

/// The statuses of `n` requests made one after another.
async fn futures_statuses(sim: &Simulator, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            call(sim, TOKEN, reqwest::Method::GET, "/v2/settings", None)
                .await
                .0,
        );
    }
    out
}

#[tokio::test]
async fn tokens_without_an_account_a_missing_one_and_a_revoked_one_get_401() {
    let sim = sim().await;
    let get = |token: &'static str| call(&sim, token, reqwest::Method::GET, "/v2/settings", None);
    assert_eq!(
        get("unknown").await.0,
        401,
        "a strict simulator knows its tokens"
    );
    assert_eq!(get("").await.0, 401);
    sim.set_unauthorized(TOKEN, true);
    let (status, _, body) = get(TOKEN).await;
    assert_eq!(
        (status, body["error"].clone()),
        (401, json!("UNAUTHORIZED"))
    );
    sim.set_unauthorized(TOKEN, false);
    assert_eq!(get(TOKEN).await.0, 200);
    let open = Simulator::start("127.0.0.1:0", true).await.unwrap();
    let (status, _, _) = call(&open, "anyone", reqwest::Method::GET, "/v2/settings", None).await;
    assert_eq!(status, 200, "an open simulator gives any token an account");
}

#[tokio::test]
async fn each_scripted_fault_plays_once_on_the_request_it_matches() {
    let sim = sim().await;
    let one = |id: &str| json!([{ "id": id, "name": "N" }]);

    // A status: not applied, its body and Retry-After as given; only the matching request.
    sim.push_fault(
        Some("POST"),
        Some("/v2/users"),
        Fault::Status {
            status: 503,
            body: "busy".into(),
            retry_after: Some("7".into()),
        },
    );
    let (status, _, _) = call(&sim, TOKEN, reqwest::Method::GET, "/v2/settings", None).await;
    assert_eq!(status, 200, "a GET does not match a POST fault");
    let (status, retry_after, _) = call(
        &sim,
        TOKEN,
        reqwest::Method::POST,
        "/v2/users",
        Some(json!({ "users": one("a") })),
    )
    .await;
    assert_eq!((status, retry_after.as_deref()), (503, Some("7")));
    assert!(sim.users(TOKEN).is_empty());
    assert_eq!(
        post_users(&sim, one("a")).await.0,
        200,
        "the fault was used up"
    );

    // Short processed: applies the first n and says so.
    sim.push_fault(None, None, Fault::ShortProcessed { processed: 1 });
    let (status, body) = post_users(
        &sim,
        json!([{ "id": "b", "name": "B" }, { "id": "c", "name": "C" }]),
    )
    .await;
    assert_eq!((status, body["data"]["processed"].clone()), (200, json!(1)));
    assert!(sim.users(TOKEN).contains_key("b") && !sim.users(TOKEN).contains_key("c"));

    // Delay: answers late.
    sim.push_fault(None, None, Fault::Delay { ms: 300 });
    let started = Instant::now();
    assert_eq!(post_users(&sim, one("d")).await.0, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Drop: nothing applied, the answer breaks off.
    sim.push_fault(None, None, Fault::Drop);
    let (status, body) = post_users(&sim, one("e")).await;
    assert!(status == 0 || status == 200, "{status}");
    assert_eq!(body, Value::Null, "no answer the client could read");
    assert!(!sim.users(TOKEN).contains_key("e"));

    // Applied, then dropped: Wazzup did it, the client cannot know.
    sim.push_fault(None, None, Fault::AppliedDrop);
    let (status, body) = post_users(&sim, one("f")).await;
    assert!(status == 0 || status == 200, "{status}");
    assert_eq!(body, Value::Null, "no answer the client could read");
    assert!(sim.users(TOKEN).contains_key("f"));
    let statuses: Vec<u16> = sim.requests().iter().map(|r| r.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        1,
        "{statuses:?}"
    );
}

#[tokio::test]
async fn an_error_rate_fails_its_share_and_latency_delays_every_answer() {
    let sim = sim().await;
    sim.set_error_rate(Some("GET"), None, 1.0, 502, 7);
    let (status, _, _) = call(&sim, TOKEN, reqwest::Method::GET, "/v2/settings", None).await;
    assert_eq!(status, 502);
    assert_eq!(post_users(&sim, users(1)).await.0, 200, "only GETs fail");
    sim.clear_faults();
    sim.set_error_rate(None, None, 0.5, 500, 7);
    let mut failed = 0;
    for _ in 0..200 {
        if call(&sim, TOKEN, reqwest::Method::GET, "/v2/settings", None)
            .await
            .0
            == 500
        {
            failed += 1;
        }
    }
    assert!(
        (60..=140).contains(&failed),
        "about half of 200 failed: {failed}"
    );
    sim.clear_faults();
    sim.set_latency(200);
    let started = Instant::now();
    assert_eq!(
        call(&sim, TOKEN, reqwest::Method::GET, "/v2/settings", None)
            .await
            .0,
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn the_switchboard_takes_faults_over_http() {
    let sim = sim().await;
    let faults = json!({
        "script": [{ "method": "PATCH", "path": "/v2/settings",
                     "fault": { "kind": "status", "status": 400, "body": "{\"error\":\"X\"}" } }],
        "unauthorized_tokens": ["tok-9"],
    });
    let resp = reqwest::Client::new()
        .post(format!("{}/_sim/faults", sim.url()))
        .json(&faults)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    let empty = json!({ "user_roles": [], "hide_phone_numbers_for_user_ids": [],
                        "push_input_output_message_events_for_managers": false });
    let (status, body) = patch_settings(&sim, empty.clone()).await;
    assert_eq!((status, body["error"].clone()), (400, json!("X")));
    assert_eq!(patch_settings(&sim, empty).await.0, 200);
    let count: Value = reqwest::get(format!("{}/_sim/requests", sim.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(count["count"], 2);
}
