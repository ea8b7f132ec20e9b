// trioworker API page: shows /api/openapi.json (OpenAPI 3.1) as a list of operations and
// schemas. An ES module (with dom.js), no build step, no dependencies; text from the
// document is always set as text, never as HTML. The API key is the dashboard's (this tab's).

import { h } from "./dom.js";

const KEY_STORAGE = "trioworker.apiKey";
const SCHEMAS = "#/components/schemas/";
const METHODS = ["get", "post", "put", "patch", "delete"];

let key = sessionStorage.getItem(KEY_STORAGE);
let doc = null;

// ---------------------------------------------------------------- schemas

function refName(schema) {
  return schema && typeof schema.$ref === "string" && schema.$ref.startsWith(SCHEMAS)
    ? schema.$ref.slice(SCHEMAS.length)
    : null;
}

// A short type: "string (uuid)", "array of TaskRun", "StateType | null".
function typeOf(schema) {
  if (!schema || Object.keys(schema).length === 0) return "any JSON";
  const name = refName(schema);
  if (name) return h("a", { href: `#schema-${name}` }, name);
  if (schema.anyOf) {
    const parts = [];
    schema.anyOf.forEach((option, i) => {
      if (i) parts.push(" | ");
      parts.push(typeOf(option));
    });
    return h("span", {}, parts);
  }
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (schema.type === "array") return h("span", {}, "array of ", typeOf(schema.items));
  if (schema.type === "object" && schema.additionalProperties) {
    return h("span", {}, "object of ", typeOf(schema.additionalProperties));
  }
  const bounds = [];
  if (schema.minimum !== undefined) bounds.push(`≥ ${schema.minimum}`);
  if (schema.maximum !== undefined) bounds.push(`≤ ${schema.maximum}`);
  const format = schema.format ? ` (${schema.format})` : "";
  return `${schema.type || "any"}${format}${bounds.length ? ` ${bounds.join(", ")}` : ""}`;
}

// The fields of an object schema (following a $ref to its component), or its type.
function fieldsOf(schema) {
  const name = refName(schema);
  const target = name ? doc.components.schemas[name] : schema;
  if (!target || !target.properties) return h("p", {}, h("span", { class: "ftype" }, typeOf(schema)));
  const required = new Set(target.required || []);
  return h(
    "div",
    {},
    name ? h("p", { class: "muted" }, h("a", { href: `#schema-${name}` }, name), target.description ? `: ${target.description}` : "") : null,
    h(
      "ul",
      { class: "fields" },
      Object.entries(target.properties).map(([field, prop]) =>
        h(
          "li",
          {},
          h("span", { class: "fname" }, field),
          " ",
          h("span", { class: "ftype" }, typeOf(prop)),
          required.has(field) ? h("span", { class: "req" }, " required") : null,
          prop.default !== undefined ? h("span", { class: "muted" }, ` = ${JSON.stringify(prop.default)}`) : null,
          prop.description ? h("span", { class: "muted" }, ` — ${prop.description}`) : null,
        ),
      ),
    ),
  );
}

// ---------------------------------------------------------------- operations

function operationView(path, method, op) {
  const websocket = op["x-websocket"] === true;
  const open = Array.isArray(op.security) && op.security.length === 0;
  const body = h("div", { class: "body" });
  if (op.description) body.append(h("p", {}, op.description));
  if (op.parameters && op.parameters.length) {
    body.append(
      h("h3", {}, "Parameters"),
      h(
        "ul",
        { class: "fields" },
        op.parameters.map((p) =>
          h(
            "li",
            {},
            h("span", { class: "fname" }, p.name),
            h("span", { class: "muted" }, ` (${p.in}) `),
            h("span", { class: "ftype" }, typeOf(p.schema)),
            p.required ? h("span", { class: "req" }, " required") : null,
            p.description ? h("span", { class: "muted" }, ` — ${p.description}`) : null,
          ),
        ),
      ),
    );
  }
  const request = op.requestBody && op.requestBody.content["application/json"];
  if (request) {
    body.append(h("h3", {}, "Request body"), fieldsOf(request.schema));
    if (request.example !== undefined) {
      body.append(h("h3", {}, "Example"), h("pre", { class: "json" }, JSON.stringify(request.example, null, 2)));
    }
  }
  body.append(h("h3", {}, "Responses"));
  for (const [status, response] of Object.entries(op.responses || {})) {
    const content = response.content || {};
    const json = content["application/json"];
    const other = Object.keys(content).filter((type) => type !== "application/json");
    body.append(
      h(
        "div",
        { class: "response" },
        h("p", {}, h("span", { class: "status-code" }, status), response.description, other.length ? h("span", { class: "muted" }, ` (${other.join(", ")})`) : null),
        // A success shows its fields; an error its schema's name (the same for all).
        json ? (status.startsWith("2") ? fieldsOf(json.schema) : h("p", { class: "ftype" }, typeOf(json.schema))) : null,
      ),
    );
  }
  return h(
    "details",
    { class: "op", id: op.operationId ? `op-${op.operationId}` : null, "data-path": path, "data-method": method },
    h(
      "summary",
      {},
      h("span", { class: `method ${websocket ? "ws" : method}` }, websocket ? "WS" : method.toUpperCase()),
      h("span", { class: "path" }, path),
      h("span", {}, op.summary || ""),
      open ? h("span", { class: "muted open-route" }, "no key needed") : null,
    ),
    body,
  );
}

function render() {
  const view = document.getElementById("docs");
  const byTag = new Map((doc.tags || []).map((tag) => [tag.name, []]));
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const method of METHODS) {
      const op = item[method];
      if (!op) continue;
      const tag = (op.tags && op.tags[0]) || "other";
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push(operationView(path, method, op));
    }
  }
  const described = new Map((doc.tags || []).map((tag) => [tag.name, tag.description]));
  const sections = [...byTag].filter(([, ops]) => ops.length).map(([tag, ops]) =>
    h("section", { class: "tag", id: `tag-${tag}` }, h("h2", {}, tag), described.get(tag) ? h("p", { class: "muted" }, described.get(tag)) : null, ops),
  );
  const schemas = Object.keys(doc.components.schemas).map((name) =>
    h(
      "details",
      { class: "op", id: `schema-${name}` },
      h("summary", {}, h("span", { class: "path" }, name)),
      h("div", { class: "body" }, fieldsOf({ $ref: `${SCHEMAS}${name}` })),
    ),
  );
  view.replaceChildren(
    h(
      "header",
      { class: "docs-head" },
      h("h1", {}, `${doc.info.title} API `, h("span", { class: "muted" }, doc.info.version)),
      doc.info.description ? h("p", { class: "muted" }, doc.info.description) : null,
    ),
    ...sections,
    h("section", { class: "tag", id: "schemas" }, h("h2", {}, "Schemas"), schemas),
  );
  // A link to a schema opens it.
  const target = location.hash && document.getElementById(location.hash.slice(1));
  if (target && target.tagName === "DETAILS") target.open = true;
}

window.addEventListener("hashchange", () => {
  const target = location.hash && document.getElementById(location.hash.slice(1));
  if (target && target.tagName === "DETAILS") target.open = true;
});

// ---------------------------------------------------------------- loading, with the key

function showLogin(message) {
  document.getElementById("docs").replaceChildren();
  document.getElementById("login").hidden = false;
  const error = document.getElementById("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  document.getElementById("api-key").focus();
}

async function load() {
  const headers = { Accept: "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch("/api/openapi.json", { headers });
  if (response.status === 401) {
    showLogin(key ? "That key was refused." : null);
    return false;
  }
  if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
  doc = await response.json();
  document.getElementById("login").hidden = true;
  render();
  return true;
}

document.getElementById("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("api-key");
  key = input.value.trim();
  if (await load()) {
    sessionStorage.setItem(KEY_STORAGE, key);
    input.value = "";
  }
});

load().catch((error) => {
  document.getElementById("docs").replaceChildren(h("p", { class: "error" }, `The API document did not load: ${error.message}`));
});
