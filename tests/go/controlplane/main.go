// A plexd control plane as a Go service would be written, for the wire-contract test
// (tests/tests/go_control_plane.rs): it decodes what the agent sends with the plexd spec's
// Go types and Go's standard library, and answers the secret request the way the control
// plane's nodeapi encrypts secrets (AES-256-GCM with the node's secret key).
//
// It prints one JSON line per request on stdout, saying what it decoded and every problem
// it found; the Rust test reads those lines. The first line says where it listens.
package main

import (
	"compress/gzip"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"reflect"
	"strings"
	"sync"
	"time"
)

// The spec's types, field for field.

type MetricPoint struct {
	Timestamp time.Time       `json:"timestamp"`
	Group     string          `json:"group"`
	PeerID    string          `json:"peer_id,omitempty"`
	Data      json.RawMessage `json:"data"`
}

type SystemStats struct {
	CPUUsagePercent  float64 `json:"cpu_usage_percent"`
	MemoryUsedBytes  uint64  `json:"memory_used_bytes"`
	MemoryTotalBytes uint64  `json:"memory_total_bytes"`
	DiskUsedBytes    uint64  `json:"disk_used_bytes"`
	DiskTotalBytes   uint64  `json:"disk_total_bytes"`
	NetworkRxBytes   uint64  `json:"network_rx_bytes"`
	NetworkTxBytes   uint64  `json:"network_tx_bytes"`
	LoadAvg1         float64 `json:"load_avg_1"`
	LoadAvg5         float64 `json:"load_avg_5"`
	LoadAvg15        float64 `json:"load_avg_15"`
}

type TunnelStats struct {
	PeerID             string    `json:"peer_id"`
	LastHandshakeTime  time.Time `json:"last_handshake_time"`
	RxBytes            uint64    `json:"rx_bytes"`
	TxBytes            uint64    `json:"tx_bytes"`
	HandshakeSucceeded bool      `json:"handshake_succeeded"`
	HandshakeStale     bool      `json:"handshake_stale"`
	PacketLossPercent  float64   `json:"packet_loss_percent"`
}

type LatencyResult struct {
	PeerID  string `json:"peer_id"`
	RTTNano int64  `json:"rtt_nano"`
}

type AgentStats struct {
	GoroutineCount int     `json:"goroutine_count"`
	HeapAllocBytes uint64  `json:"heap_alloc_bytes"`
	HeapSysBytes   uint64  `json:"heap_sys_bytes"`
	GCPauseTotalNs uint64  `json:"gc_pause_total_ns"`
	GCNumGC        uint32  `json:"gc_num_gc"`
	UptimeSeconds  float64 `json:"uptime_seconds"`
	ReconnectCount int     `json:"reconnect_count"`
}

type SecretResponse struct {
	Ciphertext []byte `json:"ciphertext"`
	Nonce      []byte `json:"nonce"`
}

// groups maps each group of the spec to its payload type and whether its points name a peer.
var groups = map[string]struct {
	payload  reflect.Type
	withPeer bool
}{
	"system":  {reflect.TypeOf(SystemStats{}), false},
	"tunnel":  {reflect.TypeOf(TunnelStats{}), true},
	"latency": {reflect.TypeOf(LatencyResult{}), true},
	"agent":   {reflect.TypeOf(AgentStats{}), false},
}

// Report is one line of output: what one request held.
type Report struct {
	Kind     string         `json:"kind"`
	Path     string         `json:"path"`
	Points   int            `json:"points"`
	Groups   map[string]int `json:"groups"`
	Problems []string       `json:"problems"`
}

var out = struct {
	sync.Mutex
	enc *json.Encoder
}{enc: json.NewEncoder(os.Stdout)}

func emit(v interface{}) {
	out.Lock()
	defer out.Unlock()
	out.enc.Encode(v)
}

// decodeBatch decodes a batch as a Go control plane would and lists what it could not take.
func decodeBatch(body []byte, r *Report) {
	var batch []MetricPoint
	if err := json.Unmarshal(body, &batch); err != nil {
		r.Problems = append(r.Problems, "batch: "+err.Error())
		return
	}
	r.Points = len(batch)
	for i, p := range batch {
		r.Groups[p.Group]++
		where := fmt.Sprintf("point %d (%s %q)", i, p.Group, p.PeerID)
		if p.Timestamp.IsZero() {
			r.Problems = append(r.Problems, where+": zero timestamp")
		}
		g, known := groups[p.Group]
		if !known {
			// Groups beyond the spec's are additions a Go control plane ignores.
			continue
		}
		if g.withPeer != (p.PeerID != "") {
			r.Problems = append(r.Problems, fmt.Sprintf("%s: peer_id present is %v", where, p.PeerID != ""))
		}
		// Every key of the Go type must be present (Go would silently leave a missing one
		// zero), and decode into its field's type.
		var keys map[string]json.RawMessage
		if err := json.Unmarshal(p.Data, &keys); err != nil {
			r.Problems = append(r.Problems, where+": data is not an object: "+err.Error())
			continue
		}
		for f := 0; f < g.payload.NumField(); f++ {
			key := strings.Split(g.payload.Field(f).Tag.Get("json"), ",")[0]
			if _, ok := keys[key]; !ok {
				r.Problems = append(r.Problems, where+": missing key "+key)
			}
		}
		payload := reflect.New(g.payload).Interface()
		if err := json.Unmarshal(p.Data, payload); err != nil {
			r.Problems = append(r.Problems, where+": "+err.Error())
			continue
		}
		if g.withPeer {
			id := reflect.ValueOf(payload).Elem().FieldByName("PeerID").String()
			if id != p.PeerID {
				r.Problems = append(r.Problems, fmt.Sprintf("%s: data peer_id %q", where, id))
			}
		}
	}
}

func readBody(req *http.Request, r *Report) []byte {
	var reader io.Reader = io.LimitReader(req.Body, 64<<20)
	if req.Header.Get("Content-Encoding") == "gzip" {
		gz, err := gzip.NewReader(reader)
		if err != nil {
			r.Problems = append(r.Problems, "gzip: "+err.Error())
			return nil
		}
		reader = gz
	}
	body, err := io.ReadAll(reader)
	if err != nil {
		r.Problems = append(r.Problems, "body: "+err.Error())
	}
	return body
}

func checkBearer(req *http.Request, want string, r *Report) {
	if got := req.Header.Get("Authorization"); got != "Bearer "+want {
		r.Problems = append(r.Problems, fmt.Sprintf("Authorization %q", got))
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address of the control plane (plain HTTP)")
	localListen := flag.String("local-listen", "127.0.0.1:0", "address of the local endpoint (HTTPS)")
	cert := flag.String("cert", "", "PEM certificate of the local endpoint")
	key := flag.String("key", "", "PEM key of the local endpoint")
	nodeID := flag.String("node", "", "the node's id")
	token := flag.String("token", "", "the bearer token the agent must send")
	nodeKeyHex := flag.String("node-key", "", "the node secret key, 64 hex digits")
	secretName := flag.String("secret-name", "", "the local endpoint's secret key name")
	secret := flag.String("secret", "", "the local endpoint's token, served encrypted")
	writeUser := flag.String("write-user", "", "basic auth user remote write must send")
	writePassword := flag.String("write-password", "", "basic auth password remote write must send")
	flag.Parse()

	nodeKey, err := hex.DecodeString(*nodeKeyHex)
	if err != nil || len(nodeKey) != 32 {
		fmt.Fprintln(os.Stderr, "-node-key: want 64 hex digits")
		os.Exit(2)
	}
	metricsPath := "/v1/nodes/" + *nodeID + "/metrics"
	secretPath := "/v1/nodes/" + *nodeID + "/secrets/" + *secretName

	cp := http.NewServeMux()
	cp.HandleFunc("/", func(w http.ResponseWriter, req *http.Request) {
		r := Report{Kind: "control_plane", Path: req.URL.Path, Groups: map[string]int{}, Problems: []string{}}
		defer emit(&r)
		switch {
		case req.Method == http.MethodPost && req.URL.Path == metricsPath:
			checkBearer(req, *token, &r)
			if req.Header.Get("Content-Type") != "application/json" {
				r.Problems = append(r.Problems, "Content-Type "+req.Header.Get("Content-Type"))
			}
			decodeBatch(readBody(req, &r), &r)
			w.WriteHeader(http.StatusAccepted)
		case req.Method == http.MethodPost && req.URL.Path == "/api/v1/write":
			// Remote write's body is snappy, which Go's standard library lacks; the real
			// receivers' tests decode it. Here only its credential matters.
			r.Kind = "remote_write"
			if user, password, ok := req.BasicAuth(); !ok || user != *writeUser || password != *writePassword {
				r.Problems = append(r.Problems, "remote write without its basic auth")
			}
			io.Copy(io.Discard, req.Body)
			w.WriteHeader(http.StatusNoContent)
		case req.Method == http.MethodGet && req.URL.Path == secretPath:
			r.Kind = "secret"
			checkBearer(req, *token, &r)
			block, _ := aes.NewCipher(nodeKey)
			gcm, _ := cipher.NewGCM(block)
			nonce := make([]byte, gcm.NonceSize())
			rand.Read(nonce)
			sealed := gcm.Seal(nil, nonce, []byte(*secret), nil)
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(SecretResponse{Ciphertext: sealed, Nonce: nonce})
		default:
			r.Problems = append(r.Problems, "unexpected "+req.Method+" "+req.URL.Path)
			w.WriteHeader(http.StatusNotFound)
		}
	})
	local := http.NewServeMux()
	local.HandleFunc("/", func(w http.ResponseWriter, req *http.Request) {
		r := Report{Kind: "local_endpoint", Path: req.URL.Path, Groups: map[string]int{}, Problems: []string{}}
		defer emit(&r)
		// The token the agent decrypted from the secret above.
		checkBearer(req, *secret, &r)
		decodeBatch(readBody(req, &r), &r)
		w.WriteHeader(http.StatusOK)
	})

	cpListener, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	localListener, err := net.Listen("tcp", *localListen)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	emit(map[string]string{
		"control_plane":  cpListener.Addr().String(),
		"local_endpoint": localListener.Addr().String(),
	})
	go func() {
		err := http.ServeTLS(localListener, local, *cert, *key)
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}()
	err = http.Serve(cpListener, cp)
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}
