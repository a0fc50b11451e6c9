// A live tail of the event bus: SSE /api/v1/events?topic=PREFIX (topics match by
// prefix, as ZeroMQ subscriptions do), and a form that publishes (POST /events).

import { api, follow } from "../api.js";
import { h, fill, show, when, attempt, showError } from "../dom.js";
import { replaceParams } from "../router.js";

export const title = "Events";

const KEEP = 500;
const RETRY_MS = 2000;

export function mount(root, params) {
  let topic = params.topic || "";
  let stop = () => {};
  let received = 0;
  const filter = h("input.topic", { value: topic, placeholder: "topic prefix (empty: every topic)", "aria-label": "topic filter" });
  const state = h("span.stream-state", { dataset: { field: "tail-state" } }, "stopped");
  const list = h("ol.events", { "aria-live": "polite" });
  const published = h("span.source", { role: "status", dataset: { field: "published" } });
  const pubTopic = h("input.topic", { placeholder: "topic", "aria-label": "topic to publish" });
  const pubPayload = h("input.payload", { placeholder: 'payload (JSON, or text)', "aria-label": "payload to publish" });

  fill(
    root,
    h(
      "div.viewbar",
      h("h2", {}, "Events"),
      h("form", { onsubmit: (e) => (e.preventDefault(), start(filter.value.trim())) }, filter, h("button", {}, "Follow")),
      state,
      h("button", { onclick: () => list.replaceChildren() }, "Clear"),
      h("span.source", {}, "SSE /api/v1/events?topic="),
    ),
    h(
      "form.publish",
      { onsubmit: (e) => (e.preventDefault(), publish()) },
      h("span", {}, "Publish "),
      pubTopic,
      pubPayload,
      h("button", {}, "Publish"),
      published,
    ),
    list,
  );

  // A tail the gateway ends or loses is followed again after RETRY_MS; a failure is
  // reported once until the tail is open again.
  let retry = null;
  let failing = false;

  function start(prefix) {
    stop();
    if (prefix !== topic) received = 0;
    topic = prefix;
    replaceParams({ topic });
    state.textContent = "connecting";
    state.dataset.state = "connecting";
    const following = follow(`/events?${new URLSearchParams({ topic })}`, {
      onEvent: (message) => add(message),
      onState: (s, exc) => {
        state.dataset.state = s;
        if (s === "open") {
          failing = false;
          state.textContent = `following ${topic || "every topic"}`;
          return;
        }
        if (s === "error" && !failing) showError("Following the events", exc);
        failing = s === "error";
        state.textContent = `${s === "closed" ? "ended by the gateway" : "failed"}: again in ${RETRY_MS / 1000} s`;
        retry = setTimeout(() => start(topic), RETRY_MS);
      },
    });
    stop = () => {
      clearTimeout(retry);
      following();
    };
  }

  function add(message) {
    if (message.event === "dropped") {
      list.prepend(h("li.event.dropped", {}, `${message.data.count} event(s) dropped: this page read too slowly`));
      return;
    }
    if (message.event !== "event") return;
    const event = message.data;
    const type = event.type;
    received += 1;
    list.prepend(
      h(
        "li.event",
        { dataset: { topic: type } },
        h("span.time", {}, when(event.timestamp)),
        h("span.topic.mono", {}, type),
        h("span.source", {}, show(event.source)),
        h("code.payload", {}, typeof event.payload === "string" ? event.payload : JSON.stringify(event.payload)),
      ),
    );
    while (list.children.length > KEEP) list.lastChild.remove();
    state.textContent = `following ${topic || "every topic"}: ${received} event(s)`;
  }

  async function publish() {
    const text = pubPayload.value;
    let payload = text;
    try {
      payload = JSON.parse(text);
    } catch {
      // not JSON: published as text
    }
    const answer = await attempt(`Publishing on ${pubTopic.value}`, () =>
      api("/events", { method: "POST", body: { topic: pubTopic.value.trim(), payload } }),
    );
    if (answer !== undefined) {
      published.textContent = `published ${answer.published.type} at ${new Date().toLocaleTimeString([], { hour12: false })}`;
    }
  }

  start(topic);
  return () => stop();
}
