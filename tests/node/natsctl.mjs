// An independent NATS client for tilepipe's tests: what an operator does with the plain
// `nats` CLI, done with the official JavaScript packages (@nats-io/transport-node,
// @nats-io/jetstream) instead of nats-py, which tilepipe itself uses.
//
//   node natsctl.mjs URL pause STREAM CONSUMER [SECONDS]   nats consumer pause
//   node natsctl.mjs URL resume STREAM CONSUMER            nats consumer resume
//   node natsctl.mjs URL reset STREAM CONSUMER [SEQ]       nats consumer reset
//   node natsctl.mjs URL info STREAM CONSUMER              nats consumer info
//   node natsctl.mjs URL view STREAM SUBJECT               nats stream view --subject
//   node natsctl.mjs URL kv-put BUCKET KEY VALUE           nats kv put
//   node natsctl.mjs URL kv-del BUCKET KEY                 nats kv del
//
// Prints one JSON document (view: one JSON line per message: seq, subject, time, headers,
// data) and exits 0, or prints the error to stderr and exits 1.
import { connect, headers } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";

const [url, command, ...args] = process.argv.slice(2);

async function view(nc, stream, subject) {
  const js = jetstream(nc);
  const consumer = await js.consumers.get(stream, { filter_subjects: [subject] });
  const decoder = new TextDecoder();
  for (;;) {
    const msg = await consumer.next({ expires: 1000 });
    if (msg === null) return;
    const hdrs = {};
    for (const [key, values] of msg.headers ?? []) hdrs[key] = values.join(",");
    const text = decoder.decode(msg.data);
    let data;
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
    console.log(JSON.stringify({
      seq: msg.seq,
      subject: msg.subject,
      time: msg.time.toISOString(),
      headers: hdrs,
      data,
    }));
    if (msg.info.pending === 0) return;
  }
}

async function main() {
  const nc = await connect({ servers: url, name: "natsctl-js" });
  try {
    const jsm = await jetstreamManager(nc);
    let out;
    switch (command) {
      case "pause": {
        const [stream, name, seconds] = args;
        const until = seconds ? new Date(Date.now() + Number(seconds) * 1000) : undefined;
        out = await jsm.consumers.pause(stream, name, until);
        break;
      }
      case "resume":
        out = await jsm.consumers.resume(args[0], args[1]);
        break;
      case "reset": {
        const [stream, name, seq] = args;
        out = await jsm.consumers.reset(stream, name, seq ? Number(seq) : undefined);
        break;
      }
      case "info":
        out = await jsm.consumers.info(args[0], args[1]);
        break;
      case "view":
        await view(nc, args[0], args[1]);
        return;
      case "kv-put": {  // a KV put is a publish on the bucket's subject for the key
        const [bucket, key, value] = args;
        out = await jetstream(nc).publish(`$KV.${bucket}.${key}`, value);
        break;
      }
      case "kv-del": {
        const [bucket, key] = args;
        const h = headers();
        h.set("KV-Operation", "DEL");
        out = await jetstream(nc).publish(`$KV.${bucket}.${key}`, "", { headers: h });
        break;
      }
      default:
        throw new Error(`unknown command ${command}`);
    }
    console.log(JSON.stringify(out));
  } finally {
    await nc.drain();
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(String(err?.stack ?? err));
    process.exit(1);
  },
);
