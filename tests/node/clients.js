// node-postgres (npm `pg`) through Topeng: run by tests/integration/test_clients_node.py.
// Usage: node clients.js DSN [WRONG_PASSWORD_DSN]
// Prints one JSON object with what each step saw; errors are reported, never thrown.
"use strict";

const { Client, Pool } = require("pg");

async function step(out, name, fn) {
  try {
    out[name] = await fn();
  } catch (err) {
    out[name] = { error: { code: err.code, message: err.message } };
  }
}

async function main() {
  const [dsn, wrongDsn] = process.argv.slice(2);
  const out = {};
  const client = new Client({ connectionString: dsn });
  await client.connect();

  await step(out, "simple", async () => {
    const r = await client.query("SELECT count(*)::int AS n FROM customers");
    return r.rows[0].n;
  });
  await step(out, "params", async () => {
    // Parameters: the extended protocol (Parse/Bind/Describe/Execute/Sync).
    const r = await client.query(
      "SELECT id, full_name, $2::text AS tag FROM customers WHERE id <= $1 ORDER BY id",
      [3, "node"],
    );
    return r.rows.map((row) => [Number(row.id), row.tag, typeof row.full_name]);
  });
  await step(out, "named", async () => {
    // A named prepared statement, reused.
    const results = [];
    for (let i = 1; i <= 3; i++) {
      const r = await client.query({ name: "by_id", text: "SELECT $1::int * 10 AS v", values: [i] });
      results.push(r.rows[0].v);
    }
    return results;
  });
  await step(out, "transaction", async () => {
    await client.query("CREATE TEMP TABLE node_t (v int)");
    await client.query("BEGIN");
    await client.query("INSERT INTO node_t VALUES ($1), ($2)", [1, 2]);
    await client.query("ROLLBACK");
    await client.query("BEGIN");
    await client.query("INSERT INTO node_t VALUES ($1)", [3]);
    await client.query("COMMIT");
    const r = await client.query("SELECT array_agg(v) AS vs FROM node_t");
    return r.rows[0].vs;
  });
  await step(out, "error", async () => {
    try {
      await client.query("SELECT 1 / $1::int", [0]);
      return "no error";
    } catch (err) {
      return { code: err.code, message: err.message };
    }
  });
  await step(out, "after_error", async () => {
    const r = await client.query("SELECT 'usable' AS s");
    return r.rows[0].s;
  });
  await step(out, "rows_mode_array", async () => {
    const r = await client.query({ text: "SELECT 1 AS a, 'b' AS b", rowMode: "array" });
    return [r.fields.map((f) => f.name), r.rows];
  });
  await client.end();

  await step(out, "pool", async () => {
    const pool = new Pool({ connectionString: dsn, max: 5 });
    const queries = [];
    for (let i = 1; i <= 5; i++) {
      queries.push(
        pool.query("SELECT $1::int AS i, pg_backend_pid() AS pid, pg_sleep(0.2)", [i]),
      );
    }
    const results = await Promise.all(queries);
    await pool.end();
    return {
      values: results.map((r) => r.rows[0].i),
      backends: new Set(results.map((r) => r.rows[0].pid)).size,
    };
  });

  if (wrongDsn) {
    await step(out, "wrong_password", async () => {
      const c = new Client({ connectionString: wrongDsn });
      try {
        await c.connect();
        await c.end();
        return "connected";
      } catch (err) {
        return { code: err.code, message: err.message };
      }
    });
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((err) => {
  process.stdout.write(JSON.stringify({ fatal: String(err && err.stack) }) + "\n");
  process.exit(1);
});
