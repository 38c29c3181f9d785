// A main server for the interoperability test (tests/interop/run), on Go's net/http: mutual
// TLS, HTTP/1.1 only or HTTP/2 too, or plain HTTP/1.1 behind nginx. Answers as run describes
// (answer()), and logs each request as one line: "deliver ID ATTEMPT STATUS" or "status ID
// ATTEMPT_COUNT STATUS_NAME".
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

var (
	logMu   sync.Mutex
	logFile *os.File
	answers int64
	variant = os.Getenv("VARIANT") == "1"
)

func logLine(line string) {
	logMu.Lock()
	defer logMu.Unlock()
	fmt.Fprintln(logFile, line)
}

// answer: ids m-N; N%20==0 is refused (400), N%10==1 is unavailable (503) on its first attempt.
func answer(id string, attempt int) int {
	n, _ := strconv.Atoi(strings.TrimPrefix(id, "m-"))
	if n%20 == 0 {
		return 400
	}
	if n%10 == 1 && attempt == 1 {
		return 503
	}
	return 200
}

func reply(w http.ResponseWriter, status int) {
	w.Header().Set("Content-Type", "application/json")
	body := []byte(`{"ok":true}`)
	if status != 200 {
		size := 64
		if variant {
			size = 200 * 1024
		}
		body = []byte(`{"detail":"` + strings.Repeat("x", size) + `"}`)
	}
	if variant && atomic.AddInt64(&answers, 1)%7 == 0 {
		w.Header().Set("Connection", "close")
	}
	if !variant {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	}
	w.WriteHeader(status)
	if variant {
		// No length: chunked, in pieces.
		half := len(body) / 2
		w.Write(body[:half])
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		w.Write(body[half:])
		return
	}
	w.Write(body)
}

func handle(w http.ResponseWriter, r *http.Request) {
	var body map[string]interface{}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		http.Error(w, "bad json", 422)
		return
	}
	if r.Method == "POST" && r.URL.Path == "/internal/messages/deliver" {
		id, _ := body["message_id"].(string)
		attempt, _ := body["attempt"].(float64)
		status := answer(id, int(attempt))
		logLine(fmt.Sprintf("deliver %s %d %d", id, int(attempt), status))
		reply(w, status)
		return
	}
	parts := strings.Split(r.URL.Path, "/")
	if r.Method == "PUT" && len(parts) == 5 && parts[4] == "status" {
		count, _ := body["attempt_count"].(float64)
		name, _ := body["status"].(string)
		logLine(fmt.Sprintf("status %s %d %s", parts[3], int(count), name))
		reply(w, 200)
		return
	}
	http.NotFound(w, r)
}

func main() {
	// MODE: h1 (mTLS, HTTP/1.1), h2 (mTLS, HTTP/2 offered), plain (HTTP/1.1, no TLS).
	mode, addr := os.Getenv("MODE"), os.Getenv("ADDR")
	var err error
	if logFile, err = os.OpenFile(os.Getenv("LOG"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err != nil {
		panic(err)
	}
	server := &http.Server{Addr: addr, Handler: http.HandlerFunc(handle)}
	if mode == "plain" {
		panic(server.ListenAndServe())
	}
	pool := x509.NewCertPool()
	ca, err := os.ReadFile(os.Getenv("CA"))
	if err != nil {
		panic(err)
	}
	pool.AppendCertsFromPEM(ca)
	server.TLSConfig = &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool}
	if mode == "h1" {
		server.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){}
	}
	panic(server.ListenAndServeTLS(os.Getenv("CERT"), os.Getenv("KEY")))
}
